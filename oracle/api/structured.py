"""What a chat request's output must match: ``response_format`` (json_object, json_schema), the
extensions vLLM (``structured_outputs``) and llama.cpp (``grammar``, GBNF) accept, and tool
calls; and compiling that into a grammar without blocking the event loop."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

from oracle.engine.grammar import Constraint, Grammar, GrammarCompiler, GrammarError

from .errors import bad_request
from .schemas import ChatCompletionRequest
from .tools import ToolSet


@dataclass
class OutputSpec:
    """A request's constraint and the parameter to blame when it does not compile. Schemas not
    marked strict are compiled leniently: keywords the library does not implement are ignored
    and the output is still constrained by the rest (strict ones must compile as given)."""

    constraint: Constraint | None
    param: str | None = None


def _answer_schema(response_format: dict | None) -> tuple[dict | None, bool]:
    """(JSON schema the answer must match, strict) from response_format; (None, True) for text."""
    if response_format is None:
        return None, True
    kind = response_format.get("type")
    if kind == "text":
        return None, True
    if kind == "json_object":
        return {"type": "object"}, True
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request("response_format.json_schema must be an object with a name and a schema",
                              "response_format.json_schema", "invalid_value")
        name = spec.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", name):
            raise bad_request("response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -",
                              "response_format.json_schema.name", "invalid_value")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise bad_request("response_format.json_schema.schema must be a JSON schema object",
                              "response_format.json_schema.schema", "invalid_value")
        return schema, spec.get("strict") is True
    raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}",
                      "response_format.type", "invalid_value")


def _extension(req: ChatCompletionRequest) -> OutputSpec | None:
    if req.grammar is not None:
        try:
            lark = gbnf_to_lark(req.grammar)
        except (GbnfToLarkError, ValueError) as e:
            raise bad_request(f"grammar is not valid GBNF: {e}", "grammar", "invalid_value") from None
        return OutputSpec(Constraint("lark", lark), "grammar")
    so = req.structured_outputs
    if so is None:
        return None
    given = [k for k in ("json", "regex", "choice", "grammar") if so.get(k) is not None]
    if len(given) != 1:
        raise bad_request("structured_outputs takes exactly one of json, regex, choice, grammar", "structured_outputs", "invalid_value")
    kind, value = given[0], so[given[0]]
    param = f"structured_outputs.{kind}"
    if kind == "json":
        schema = json.loads(value) if isinstance(value, str) else value
        if not isinstance(schema, dict):
            raise bad_request(f"{param} must be a JSON schema", param, "invalid_value")
        return OutputSpec(Constraint.json_schema(schema, lenient=True), param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{param} must be a non-empty list of strings", param, "invalid_value")
        return OutputSpec(Constraint("lark", "start: " + " | ".join(json.dumps(c) for c in value)), param)
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string", param, "invalid_value")
    return OutputSpec(Constraint("regex" if kind == "regex" else "lark", value), param)


def output_spec(req: ChatCompletionRequest, toolset: ToolSet | None) -> OutputSpec:
    answer, strict = _answer_schema(req.response_format)
    extension = _extension(req)
    if extension is not None:
        if answer is not None or (toolset is not None and toolset.mode != "none"):
            raise bad_request("grammar and structured_outputs cannot be combined with response_format or tools",
                              extension.param, "invalid_value")
        return extension
    if toolset is not None and toolset.mode != "none":
        return OutputSpec(toolset.constraint(answer, strict), "tools")
    if answer is None:
        return OutputSpec(None)
    return OutputSpec(Constraint.json_schema(answer, lenient=not strict), "response_format")


async def compile_output(compiler: GrammarCompiler, spec: OutputSpec) -> Grammar | None:
    """The compiled grammar (cached by source), compiled on a worker thread; 400 if it cannot be."""
    if spec.constraint is None:
        return None
    try:
        return await asyncio.get_running_loop().run_in_executor(None, compiler.compile, spec.constraint)
    except GrammarError as e:
        raise bad_request(f"Invalid schema or grammar for {spec.param}: {e}", spec.param, "invalid_value") from None
