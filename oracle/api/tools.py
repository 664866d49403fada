"""Tool calling: the offered functions and the caller's choice, the prompt text that shows them to
the model, the grammar that makes its calls valid, and the calls read back out of its text.

The model writes calls in one format, whatever the chat template: a ``<tool_call>`` block holding
a JSON array of ``{"name": ..., "arguments": {...}}`` objects, the format SmolLM2 and
Hermes-style models were trained on. Tools and tool turns become prompt text in that format too
(a system block listing the tools, ``<tool_call>`` blocks in assistant turns, ``<tool_response>``
blocks for results), so nothing a client sends is dropped on the way into the prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from oracle.engine.grammar import JSON_OPTIONS, Constraint

from .errors import bad_request

OPEN, CLOSE = "<tool_call>", "</tool_call>"
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict
    strict: bool = False  # OpenAI's strict: the parameters schema must compile as given

    def as_prompt(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def call_schema(self) -> dict:
        return {"type": "object", "properties": {"name": {"const": self.name}, "arguments": self.parameters},
                "required": ["name", "arguments"], "additionalProperties": False}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def call_id(completion_id: str, choice: int, index: int) -> str:
    """Deterministic, so a streamed call and the stored completion carry the same id."""
    return "call_" + hashlib.sha256(f"{completion_id}/{choice}/{index}".encode()).hexdigest()[:24]


def _parameters(value: Any, param: str) -> dict:
    if value is None:
        return {"type": "object", "properties": {}}
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be a JSON schema object", param, "invalid_value")
    return value


@dataclass
class ToolSet:
    """The functions offered and how the model may use them: ``mode`` none | auto | required |
    named (``forced`` is the function's name); ``legacy``: the request used the deprecated
    ``functions``/``function_call``, so the answer uses ``function_call`` too."""

    functions: list[Function]
    mode: str = "auto"
    forced: str | None = None
    parallel: bool = True
    legacy: bool = False
    by_name: dict[str, Function] = field(init=False)

    def __post_init__(self) -> None:
        self.by_name = {f.name: f for f in self.functions}

    @classmethod
    def from_request(cls, tools, tool_choice, functions, function_call, parallel_tool_calls) -> "ToolSet | None":
        legacy = tools is None and functions is not None
        if tools is not None and functions is not None:
            raise bad_request("Use either tools or the deprecated functions, not both", "functions", "invalid_value")
        specs, where = (functions, "functions") if legacy else (tools, "tools")
        choice, choice_param = (function_call, "function_call") if legacy else (tool_choice, "tool_choice")
        if not specs:
            if choice not in (None, "none"):
                raise bad_request(f"{choice_param} is set but no {where} are given", choice_param, "invalid_value")
            return None
        fns = []
        for i, spec in enumerate(specs):
            param = f"{where}[{i}]"
            if not isinstance(spec, dict):
                raise bad_request(f"{param} must be an object", param, "invalid_value")
            if not legacy:
                if spec.get("type") != "function":
                    raise bad_request(f"{param}: tools of type {spec.get('type')!r} are not supported; only 'function'",
                                      f"{param}.type", "unsupported_parameter")
                spec = spec.get("function")
                param += ".function"
                if not isinstance(spec, dict):
                    raise bad_request(f"{param} must be an object", param, "invalid_value")
            name = spec.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                raise bad_request(f"{param}.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -", f"{param}.name", "invalid_value")
            description = spec.get("description") or ""
            if not isinstance(description, str):
                raise bad_request(f"{param}.description must be a string", f"{param}.description", "invalid_value")
            fns.append(Function(name, description, _parameters(spec.get("parameters"), f"{param}.parameters"), spec.get("strict") is True))
        if len({f.name for f in fns}) != len(fns):
            raise bad_request(f"{where} has two functions with the same name", where, "invalid_value")
        toolset = cls(fns, parallel=parallel_tool_calls is not False and not legacy, legacy=legacy)
        if choice is None or choice == "auto":
            toolset.mode = "auto"
        elif choice in ("none", "required"):
            toolset.mode = choice
        else:
            name = None
            if isinstance(choice, dict):
                name = choice.get("name") if legacy else (choice.get("function") or {}).get("name")
                if not legacy and choice.get("type") != "function":
                    name = None
            if not isinstance(name, str):
                raise bad_request(f"{choice_param} must be 'none', 'auto', 'required' or name a function", choice_param, "invalid_value")
            if name not in toolset.by_name:
                raise bad_request(f"{choice_param} names {name!r}, which is not among the {where}", choice_param, "invalid_value")
            toolset.mode, toolset.forced = "named", name
        if legacy and toolset.mode == "required":
            raise bad_request("function_call must be 'none', 'auto' or name a function", choice_param, "invalid_value")
        return toolset

    # --- the grammar ---------------------------------------------------------------------------

    def calls_schema(self) -> dict:
        offered = [self.by_name[self.forced]] if self.mode == "named" else self.functions
        items = offered[0].call_schema() if len(offered) == 1 else {"anyOf": [f.call_schema() for f in offered]}
        schema = {"type": "array", "items": items, "minItems": 1}
        if not self.parallel or self.mode == "named":
            schema["maxItems"] = 1
        return schema

    def constraint(self, answer: dict | None = None, answer_strict: bool = True) -> Constraint:
        """What the output must match (``mode`` is not none). required / named: one call block.
        auto: free text (or the ``answer`` schema, when response_format asks for one), or a call
        block; once the model writes ``<tool_call>``, the rest of the block is forced valid.
        Schemas not marked strict are compiled leniently: keywords the library does not implement
        are ignored, as OpenAI accepts any schema for non-strict tools."""
        block = f'"{OPEN}" calls "{CLOSE}"'
        # Inline %json takes its compile options from the schema itself (compact, as for response_format).
        lenient = not all(f.strict for f in self.functions)
        rules = [f"calls: %json {json.dumps({**self.calls_schema(), 'x-guidance': {**JSON_OPTIONS, 'lenient': lenient}})}"]
        if self.mode in ("required", "named"):
            start = f"start: {block}"
        elif answer is not None:
            start = f"start: answer | {block}"
            rules.append(f"answer: %json {json.dumps({**answer, 'x-guidance': {**JSON_OPTIONS, 'lenient': not answer_strict}})}")
        else:
            # A lazy lexeme ends at the first "<tool_call>", so plain text can carry on past a "<" and a started call is forced.
            start = f'start: TEXT | head calls "{CLOSE}"'
            rules += [f'head[lazy]: TEXT "{OPEN}"', "TEXT: /(?s:.*)/"]
        return Constraint("lark", "\n".join([start, *rules]))

    # --- the prompt ----------------------------------------------------------------------------

    def system_text(self) -> str:
        listed = json.dumps([f.as_prompt() for f in self.functions], ensure_ascii=False)
        how = {
            "auto": "If a tool helps, call it; otherwise answer normally.",
            "required": "You must call at least one tool.",
            "named": f"You must call the tool {self.forced!r}.",
        }[self.mode]
        return (
            "You can call the following tools, described as JSON schemas:\n"
            f"<tools>{listed}</tools>\n\n"
            f"{how} To call tools, reply with only a JSON list of calls between {OPEN} and {CLOSE}, like this:\n"
            f'{OPEN}[{{"name": "tool_name", "arguments": {{"argument": "value"}}}}]{CLOSE}\n'
            "Tool results come back in <tool_response> blocks."
        )


def render_messages(messages: list, toolset: ToolSet | None) -> list[dict]:
    """Chat messages as the template's plain role/content dicts, with tools and tool turns as text."""
    out: list[dict] = []
    called: dict[str, str] = {}  # call id -> function name, so a result names what it answers
    for m in messages:
        for c in m.tool_calls or []:
            if isinstance(c.get("id"), str):
                called[c["id"]] = (c.get("function") or {}).get("name")
        if m.role == "tool" or (m.role == "function"):
            name = m.name or called.get(m.tool_call_id)
            response = json.dumps({"tool_call_id": m.tool_call_id, "name": name, "content": m.text()}, ensure_ascii=False)
            block = f"<tool_response>{response}</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("tool_responses"):
                out[-1]["content"] += "\n" + block  # results of one turn's parallel calls share a message
            else:
                out.append({"role": "user", "content": block, "tool_responses": True})
            continue
        content = m.text()
        calls = m.tool_calls or ([{"function": m.function_call}] if m.function_call else [])
        if m.role == "assistant" and calls:
            listed = []
            for c in calls:
                fn = c.get("function") or {}
                try:
                    arguments = json.loads(fn.get("arguments") or "{}")
                except (TypeError, json.JSONDecodeError):
                    arguments = fn.get("arguments")
                listed.append({"name": fn.get("name"), "arguments": arguments})
            content = (content + "\n" if content else "") + OPEN + json.dumps(listed, ensure_ascii=False) + CLOSE
        out.append({"role": m.role, "content": content, **({"name": m.name} if m.name else {})})
    for m in out:
        m.pop("tool_responses", None)
    if toolset is not None and toolset.mode != "none":
        text = toolset.system_text()
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def parse_calls(text: str, completion_id: str, choice: int) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished answer. Text with no complete call block is all content.
    The list is read as JSON, not up to the first closing tag: an argument may contain one."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    body = text[start + len(OPEN):]
    try:
        listed, end = json.JSONDecoder().raw_decode(body, len(body) - len(body.lstrip()))
    except json.JSONDecodeError:
        return text, []
    if not body[end:].lstrip().startswith(CLOSE):
        return text, []
    if not isinstance(listed, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in listed):
        return text, []
    calls = [ToolCall(call_id(completion_id, choice, i), c["name"], json.dumps(c.get("arguments", {}), ensure_ascii=False))
             for i, c in enumerate(listed)]
    content = text[:start].strip()
    return content or None, calls


class CallStream:
    """Splits a streamed answer into content deltas and OpenAI tool-call deltas, so that call
    markup never shows up as content: text that could be the start of ``<tool_call>`` is held
    back until it is clear; inside a block, each call is announced (index, id, name) as soon as
    its name is complete, then its arguments follow as they are generated."""

    def __init__(self, completion_id: str, choice: int):
        self.completion_id = completion_id
        self.choice = choice
        self.held = ""  # content not yet sent: maybe the start of OPEN
        self.in_block = False
        self.done = False  # the list of calls closed: what follows is the closing tag
        self.depth = 0  # JSON nesting inside the block: 1 in the list, 2 in a call object
        self.in_string = False
        self.escaped = False
        self.calls = 0  # calls announced so far
        self.state = "between"  # between calls | head (before "arguments":) | args (its value) | tail
        self.head = ""
        self.args_started = False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content delta, tool-call deltas) for the next piece of text."""
        if self.in_block:
            return "", self._scan(text)
        self.held += text
        start = self.held.find(OPEN)
        if start >= 0:
            content, rest = self.held[:start], self.held[start + len(OPEN):]
            self.held, self.in_block = "", True
            return content, self._scan(rest)
        keep = next((n for n in range(min(len(OPEN) - 1, len(self.held)), 0, -1) if OPEN.startswith(self.held[-n:])), 0)
        content = self.held[:len(self.held) - keep]
        self.held = self.held[len(content):]
        return content, []

    def flush(self) -> str:
        """Held-back content at the end of the answer (it was not a call after all)."""
        content, self.held = self.held, ""
        return content

    def _scan(self, text: str) -> list[dict]:
        deltas: list[dict] = []
        args = ""

        def end_args():
            nonlocal args
            if args:
                deltas.append({"index": self.calls, "function": {"arguments": args}})
                args = ""

        for ch in text:
            if self.done:
                break
            before, quoted = self.depth, self.in_string
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "[{":
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
            if self.state == "between":
                if before == 1 and self.depth == 2:
                    self.state, self.head = "head", ch
                elif self.depth == 0 and before == 1:
                    self.done = True
            elif self.state == "head":
                self.head += ch
                if not self.in_string and re.search(r'"arguments"\s*:\s*$', self.head):
                    name = re.search(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', self.head)
                    deltas.append({"index": self.calls, "id": call_id(self.completion_id, self.choice, self.calls),
                                   "type": "function",
                                   "function": {"name": json.loads(f'"{name[1]}"') if name else "", "arguments": ""}})
                    self.state, self.args_started = "args", False
            elif self.state == "args":
                if not self.args_started and ch.isspace():
                    continue
                if not quoted and before == 2 and ch in ",}":
                    # A scalar value ended just before this character.
                    end_args()
                    self.state = "tail"
                else:
                    self.args_started = True
                    args += ch
                    if not self.in_string and before == 3 and self.depth == 2:  # an object or list value closed
                        end_args()
                        self.state = "tail"
            if self.state == "tail" and self.depth == 1:
                self.calls += 1
                self.state = "between"
        end_args()
        return deltas
