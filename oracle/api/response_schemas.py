"""The Responses API's request and response bodies (``POST /v1/responses`` and its family).

A response request converts itself into a chat completion request (``to_chat``): the handler
then runs it down the same path as chat completions, so there is one way to generation.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator

from .errors import bad_request, not_supported
from .schemas import ChatCompletionRequest, ChatMessage, Schema, TaintMark, check_metadata

BUILTIN_TOOLS = ("web_search", "web_search_preview", "file_search", "computer_use_preview", "code_interpreter", "image_generation",
                 "mcp", "local_shell", "custom")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_of(content: Any, param: str, kinds: tuple[str, ...]) -> str:
    """A message's content (a string or a list of text parts) as text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param, "invalid_value")
    out = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds or not isinstance(part.get("text"), str):
            raise bad_request(f"{param}[{i}] has type {kind!r}; only {', '.join(kinds)} parts with text are supported",
                              f"{param}[{i}]", "invalid_value")
        out.append(part["text"])
    return "".join(out)


class ResponseRequest(Schema):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None  # an extension: OpenAI's Responses API has none
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = False
    truncation: Literal["disabled", "auto"] | None = None
    user: str | None = None
    speculative: Literal["off", "ngram", "scout", "auto"] | None = None
    # Known but not implemented: rejected with a 400 when set.
    background: bool | None = None
    conversation: Any = None
    prompt: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    top_logprobs: int | None = None

    UNSUPPORTED: ClassVar[tuple[str, ...]] = ("background", "conversation", "prompt", "reasoning", "max_tool_calls", "top_logprobs")

    @field_validator("metadata")
    @classmethod
    def metadata_limits(cls, value):
        return check_metadata(value)

    def check_supported(self) -> None:
        for name in self.UNSUPPORTED:
            value = getattr(self, name)
            if value is not None and value is not False:
                raise not_supported(name)

    # --- input items ---------------------------------------------------------------------------

    def input_items(self) -> list[dict]:
        """The input as normalized items with ids (what ``input_items`` lists)."""
        if isinstance(self.input, str):
            return [{"type": "message", "id": new_id("msg"), "role": "user", "status": "completed",
                     "content": [{"type": "input_text", "text": self.input}]}]
        items = []
        for i, item in enumerate(self.input):
            param = f"input[{i}]"
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in ("user", "system", "developer", "assistant"):
                    raise bad_request(f"{param}.role must be user, system, developer or assistant", f"{param}.role", "invalid_value")
                parts = ("output_text",) if role == "assistant" else ("input_text", "text")
                text = _text_of(item.get("content"), f"{param}.content", parts)
                items.append({"type": "message", "id": item.get("id") or new_id("msg"), "role": role, "status": "completed",
                              "content": [{"type": "output_text" if role == "assistant" else "input_text", "text": text,
                                           **({"annotations": []} if role == "assistant" else {})}]})
            elif kind == "function_call":
                if not isinstance(item.get("call_id"), str) or not isinstance(item.get("name"), str) \
                        or not isinstance(item.get("arguments"), str):
                    raise bad_request(f"{param} needs call_id, name and arguments (a JSON string)", param, "invalid_value")
                items.append({"type": "function_call", "id": item.get("id") or new_id("fc"), "call_id": item["call_id"],
                              "name": item["name"], "arguments": item["arguments"], "status": "completed"})
            elif kind == "function_call_output":
                output = item.get("output")
                if not isinstance(item.get("call_id"), str):
                    raise bad_request(f"{param}.call_id is required", f"{param}.call_id", "missing_required_parameter")
                if not isinstance(output, str):
                    output = _text_of(output, f"{param}.output", ("input_text", "output_text", "text"))
                items.append({"type": "function_call_output", "id": item.get("id") or new_id("fco"), "call_id": item["call_id"],
                              "output": output, "status": "completed"})
            else:
                raise bad_request(f"{param} has type {kind!r}; supported: message, function_call, function_call_output",
                                  f"{param}.type", "unsupported_parameter")
        return items

    # --- the chat request it becomes -------------------------------------------------------------

    def _chat_tools(self) -> tuple[list[dict] | None, Any]:
        if self.tools is None:
            return None, self.tool_choice
        tools = []
        for i, tool in enumerate(self.tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                if kind in BUILTIN_TOOLS:
                    raise not_supported(f"tools[{i}].type", f"the built-in tool {kind!r}")
                raise bad_request(f"tools[{i}].type must be 'function'", f"tools[{i}].type", "invalid_value")
            tools.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}})
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        return tools, choice

    def _response_format(self) -> dict | None:
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict):
            raise bad_request("text.format must be an object", "text.format", "invalid_value")
        if fmt.get("type") == "json_schema":
            return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        return fmt

    def to_chat(self, messages: list[ChatMessage]) -> ChatCompletionRequest:
        tools, choice = self._chat_tools()
        if not messages:
            raise bad_request("input must not be empty", "input", "invalid_value")
        try:
            return ChatCompletionRequest(
                model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens, temperature=self.temperature,
                top_p=self.top_p, seed=self.seed, tools=tools, tool_choice=choice, parallel_tool_calls=self.parallel_tool_calls,
                response_format=self._response_format(), user=self.user, speculative=self.speculative, store=False,
            )
        except ValidationError as e:  # the fields were checked on the way in; this names what is left
            raise bad_request(f"Invalid request: {e.errors()[0].get('msg', 'invalid value')}", "input", "invalid_value") from None


def items_to_messages(items: list[dict]) -> list[ChatMessage]:
    """Response items as chat messages: function calls join the assistant turn they follow."""
    out: list[ChatMessage] = []
    for item in items:
        kind = item["type"]
        if kind == "message":
            out.append(ChatMessage(role=item["role"], content="".join(p["text"] for p in item["content"])))
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            if out and out[-1].role == "assistant":
                out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
            else:
                out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            out.append(ChatMessage(role="tool", tool_call_id=item["call_id"], content=item["output"]))
    return out


class ResponseUsage(Schema):
    input_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens: int
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int


class ResponseObject(Schema):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]]
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    store: bool = True
    user: str | None = None


class StoredResponse(ResponseObject):
    tainted_by: list[TaintMark] | None = None  # Shard: Scouts that computed it and later failed a check


class ResponseDeleted(Schema):
    id: str
    object: Literal["response"] = "response"
    deleted: bool


class InputItemList(Schema):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool

