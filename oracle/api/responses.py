"""``/v1/responses``: the Responses API over the chat completion path.

A response request becomes a chat request (``ResponseRequest.to_chat``) and runs through
``prepare_chat`` like any chat completion: one sampler, one scheduler, the same grammar and tool
format. Responses are stored in Redis like completions (a key sees only its own), and
``previous_response_id`` continues a stored conversation: its items and output become history.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

from oracle.engine.sequence import Sequence

from .errors import APIError
from .generation import job_events, make_sequences, run_to_end, submit
from .response_schemas import (
    InputItemList, ResponseDeleted, ResponseObject, ResponseRequest, ResponseUsage, StoredResponse, items_to_messages, new_id,
)
from .routes import (
    PreparedChat, check_model, page_params, parse, prepare_chat, reserve_tokens, settle_tokens, start_sse, token_budget,
)
from .schemas import ChatMessage
from .state import STATE, OracleState
from .tools import CallStream, ToolSet, parse_calls


def response_not_found(ident: str, param: str = "response_id") -> APIError:
    return APIError(404, f"No response found with id '{ident}'", param=param, code="not_found")


def owner_of(request: web.Request) -> str | None:
    key = request["key"]
    return None if key.is_admin else key.id


@dataclass
class ResponseBuilder:
    """Shapes one sequence's output as a response object; the streamed events and the final
    object share its item ids."""

    ident: str
    created: int
    model: str
    req: ResponseRequest
    toolset: ToolSet | None
    prompt_len: int
    message_id: str = field(default_factory=lambda: new_id("msg"))

    def function_call_item(self, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
        return {"type": "function_call", "id": "fc_" + call_id.removeprefix("call_"), "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    def message_item(self, text: str, status: str = "completed") -> dict:
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}

    def output(self, seq: Sequence) -> list[dict]:
        text, calls = seq.text, []
        if self.toolset is not None:
            text, calls = parse_calls(seq.text, self.ident, 0)
        items = [self.message_item(text)] if text or not calls else []
        return items + [self.function_call_item(c.id, c.name, c.arguments) for c in calls]

    def obj(self, status: str, output: list[dict], seq: Sequence | None = None, error: dict | None = None) -> ResponseObject:
        req = self.req
        usage = None
        if seq is not None:
            usage = ResponseUsage(input_tokens=self.prompt_len, output_tokens=len(seq.output), total_tokens=self.prompt_len + len(seq.output))
        return ResponseObject(
            id=self.ident, created_at=self.created, status=status, error=error, model=self.model, output=output, usage=usage,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens,
            parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
            temperature=1.0 if req.temperature is None else req.temperature, top_p=1.0 if req.top_p is None else req.top_p,
            tool_choice=req.tool_choice if req.tool_choice is not None else "auto", tools=req.tools or [],
            text=req.text or {"format": {"type": "text"}}, truncation=req.truncation or "disabled", metadata=req.metadata or {},
            store=req.store is not False, user=req.user,
        )

    def final(self, seq: Sequence) -> ResponseObject:
        return self.obj("incomplete" if seq.finish_reason == "length" else "completed", self.output(seq), seq)


async def _prepare(state: OracleState, req: ResponseRequest, history: list[dict], items: list[dict],
                   budget: int | None) -> tuple[PreparedChat, list[dict]]:
    """The chat work for this conversation; with ``truncation: auto``, the oldest items are
    dropped until the prompt fits (``disabled``: the context error stands)."""
    instructions = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    conversation = history + items
    while True:
        try:
            return await prepare_chat(state, req.to_chat(instructions + items_to_messages(conversation)), budget), conversation
        except APIError as e:
            if e.code != "context_length_exceeded" or req.truncation != "auto" or len(conversation) <= 1:
                raise
            conversation = conversation[1:]
            while conversation and conversation[0]["type"] == "function_call_output":
                conversation = conversation[1:]  # a result without its call is not a turn


async def create_response(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req: ResponseRequest = await parse(request, ResponseRequest)
    model = check_model(state, req.model)
    req.check_supported()
    history: list[dict] = []
    if req.previous_response_id is not None:
        record = await state.responses.get(req.previous_response_id, owner_of(request)) if state.responses is not None else None
        if record is None:
            raise response_not_found(req.previous_response_id, "previous_response_id")
        history = record["conversation"] + record["response"]["output"]
    items = req.input_items()
    prep, conversation = await _prepare(state, req, history, items, token_budget(request))
    reserved = await reserve_tokens(request, len(prep.prompt_ids) + prep.params.max_tokens)
    seq = make_sequences(prep.prompt_ids, prep.params, 1, state.tokenizer, state.context_length)[0]
    job = submit(state.scheduler, [seq])
    builder = ResponseBuilder(new_id("resp"), int(time.time()), model, req, prep.toolset, len(prep.prompt_ids))
    record = {"items": items, "conversation": conversation}
    if req.stream:
        return await stream_response(request, state, job, seq, builder, record, reserved)
    await run_to_end(job, request, state.scheduler, state.metrics)
    body = builder.final(seq)
    await finish_response(request, req, body, record, reserved, seq)
    return web.json_response(text=body.model_dump_json())


async def finish_response(request: web.Request, req: ResponseRequest, body: ResponseObject, record: dict, reserved: int,
                          seq: Sequence) -> None:
    """Settle the token reservation; store the response unless ``store: false`` or disabled."""
    state = request.app[STATE]
    await settle_tokens(request, reserved, body.usage.total_tokens if body.usage else reserved)
    wants_store = state.store_by_default if req.store is None else req.store
    if state.responses is None or not wants_store:
        return
    stored = {
        "id": body.id, "owner": request["key"].id, "created_ms": int(time.time() * 1000), "response": body.model_dump(),
        "items": record["items"], "conversation": record["conversation"], "metadata": body.metadata,
    }
    # Marked if a Scout that computed it has since failed a check, and labelled so a later failure marks it.
    taint = state.swarm.taint if state.swarm is not None else None
    if taint is not None and (marks := taint.label([seq.session], body.id)):
        stored["tainted_by"] = marks
    await state.responses.save(stored)


class EventStream:
    """The Responses API's SSE events, each with its ``sequence_number``."""

    def __init__(self, response: web.StreamResponse):
        self.response = response
        self.numbers = itertools.count()

    async def emit(self, kind: str, **fields) -> None:
        data = json.dumps({"type": kind, "sequence_number": next(self.numbers), **fields}, ensure_ascii=False)
        await self.response.write(f"event: {kind}\ndata: {data}\n\n".encode())


async def stream_response(request, state: OracleState, job, seq: Sequence, builder: ResponseBuilder, record: dict,
                          reserved: int) -> web.StreamResponse:
    response = await start_sse(request)
    events = EventStream(response)
    splitter = CallStream(builder.ident, 0) if builder.toolset is not None else None
    output: list[dict] = []  # finished items
    text = ""  # of the open message
    message_open = False
    call: dict | None = None  # the open function call item

    async def open_message():
        nonlocal message_open
        message_open = True
        await events.emit("response.output_item.added", output_index=len(output), item=builder.message_item("", "in_progress"))
        await events.emit("response.content_part.added", item_id=builder.message_id, output_index=len(output), content_index=0,
                          part={"type": "output_text", "text": "", "annotations": []})

    async def close_message():
        nonlocal message_open
        part = {"type": "output_text", "text": text, "annotations": []}
        await events.emit("response.output_text.done", item_id=builder.message_id, output_index=len(output), content_index=0,
                          text=text, logprobs=[])
        await events.emit("response.content_part.done", item_id=builder.message_id, output_index=len(output), content_index=0, part=part)
        item = builder.message_item(text)
        await events.emit("response.output_item.done", output_index=len(output), item=item)
        output.append(item)
        message_open = False

    async def close_call():
        nonlocal call
        item = {**call, "status": "completed"}
        await events.emit("response.function_call_arguments.done", item_id=item["id"], output_index=len(output),
                          arguments=item["arguments"], name=item["name"])
        await events.emit("response.output_item.done", output_index=len(output), item=item)
        output.append(item)
        call = None

    async def on_text(delta: str):
        nonlocal text
        if not delta:
            return
        if not message_open:
            await open_message()
        text += delta
        await events.emit("response.output_text.delta", item_id=builder.message_id, output_index=len(output), content_index=0,
                          delta=delta, logprobs=[])

    async def on_call(delta: dict):
        nonlocal call
        if "id" in delta:
            if message_open:
                await close_message()
            if call is not None:
                await close_call()
            call = builder.function_call_item(delta["id"], delta["function"]["name"], "", "in_progress")
            await events.emit("response.output_item.added", output_index=len(output), item=call)
            return
        fragment = delta["function"]["arguments"]
        call["arguments"] += fragment
        await events.emit("response.function_call_arguments.delta", item_id=call["id"], output_index=len(output), delta=fragment)

    try:
        await events.emit("response.created", response=builder.obj("in_progress", []).model_dump())
        await events.emit("response.in_progress", response=builder.obj("in_progress", []).model_dump())
        async for _, event in job_events(job, request, state.scheduler, state.metrics):
            content, calls = (event.text, []) if splitter is None else splitter.feed(event.text)
            if event.finish_reason and splitter is not None:
                content += splitter.flush()
            await on_text(content)
            for delta in calls:
                await on_call(delta)
        if not job.finished:
            return response
        if call is not None:
            await close_call()
        if message_open or not output:
            if not message_open:
                await open_message()
            await close_message()
        final = builder.final(seq)
        # Stored before the last event, so a client that retrieves it right after finds it.
        await finish_response(request, builder.req, final, record, reserved, seq)
        await events.emit("response.completed" if final.status == "completed" else "response.incomplete", response=final.model_dump())
    except APIError as e:
        error = {"code": e.code, "message": e.message}
        await events.emit("error", code=e.code, message=e.message, param=e.param)
        await events.emit("response.failed", response=builder.obj("failed", output, error=error).model_dump())
    except ConnectionError:
        state.scheduler.cancel(job)
    return response


async def get_response(request: web.Request) -> web.Response:
    record = await _stored(request)
    return web.json_response(text=StoredResponse(**record["response"], tainted_by=record.get("tainted_by")).model_dump_json())


async def delete_response(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ident = request.match_info["response_id"]
    if state.responses is None or not await state.responses.delete(ident, owner_of(request)):
        raise response_not_found(ident)
    return web.json_response(text=ResponseDeleted(id=ident, deleted=True).model_dump_json())


async def input_items(request: web.Request) -> web.Response:
    record = await _stored(request)
    limit, after, order = page_params(request)
    items = list(record["items"])
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    body = InputItemList(data=page, first_id=page[0]["id"] if page else None, last_id=page[-1]["id"] if page else None,
                         has_more=len(items) > limit)
    return web.json_response(text=body.model_dump_json())


async def _stored(request: web.Request) -> dict:
    state = request.app[STATE]
    ident = request.match_info["response_id"]
    record = await state.responses.get(ident, owner_of(request)) if state.responses is not None else None
    if record is None:
        raise response_not_found(ident)
    return record
