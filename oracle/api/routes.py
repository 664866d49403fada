"""HTTP handlers: thin translations between OpenAI shapes and the scheduler."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel, ValidationError

from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence
from shard_common.tokenizer import ChatTemplateError

from .errors import APIError, bad_request, from_validation_error, model_not_found, not_supported
from .generation import (
    choice_logprobs, job_events, make_sequences, run_to_end, submit, usage_of,
)
from .schemas import (
    AssistantMessage, ChatChoice, ClusterStatus, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage, ChunkChoice,
    ChunkDelta, Completion, CompletionChoice, CompletionLogprobs, CompletionRequest, Deleted, FunctionCall, Health, MetadataUpdate,
    ModelCard, ModelList, StoredCompletion, StoredList, StoredMessage, StoredMessageList, SwarmInfo, ToolCall,
)
from .state import STATE, OracleState
from .structured import compile_output, output_spec
from .tools import CallStream, ToolSet, parse_calls, render_messages



def encodable(body) -> bool:
    """Whether every string in ``body`` is valid Unicode text (JSON escapes can encode lone surrogates)."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
        return True
    except UnicodeEncodeError:
        return False


async def parse(request: web.Request, model: type[BaseModel]):
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise bad_request(f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object", code="invalid_json")
    if b"\\ud" in raw.lower() and not encodable(body):  # only an escape can smuggle a lone surrogate in
        raise bad_request("The request body contains an unpaired UTF-16 surrogate escape (\\ud800-\\udfff): "
                          "that is not text", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from None
    except RecursionError:
        raise bad_request("The request body is nested too deeply", code="invalid_json") from None


def check_model(state: OracleState, name: str) -> str:
    if name not in state.model_ids:
        raise model_not_found(name)
    return name


async def sse(response: web.StreamResponse, payload: BaseModel | str) -> None:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_none=False)
    await response.write(f"data: {data}\n\n".encode())


async def start_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response


async def sse_error(response: web.StreamResponse, err: APIError) -> None:
    await response.write(f"data: {json.dumps(err.body())}\n\n".encode())


# --- chat ---------------------------------------------------------------------------------------


@dataclass
class PreparedChat:
    """A validated chat request turned into engine work: the prompt, the sampling parameters
    (with the compiled grammar) and the tools the answer may call (None: no call is parsed)."""

    prompt_ids: list[int]
    params: SamplingParams  # max_tokens resolved: what the answer may use, and what is reserved
    toolset: ToolSet | None


def token_budget(request: web.Request) -> int | None:
    """The most tokens one request of this key may spend (None: no limit)."""
    key = request["key"]
    return key.tpm if request.app[STATE].rate_limits is not None and key.tpm > 0 else None


async def prepare_chat(state: OracleState, req: ChatCompletionRequest, budget: int | None = None) -> PreparedChat:
    """Shared by chat completions and responses: one way from a request to sequences
    (``budget``: the key's ``token_budget``)."""
    for name in ChatCompletionRequest.UNSUPPORTED:
        if getattr(req, name) is not None:
            raise not_supported(name)
    n = req.n or 1
    if n > state.limits.max_n:
        raise bad_request(f"n is limited to {state.limits.max_n} on this server", "n", "invalid_value")
    toolset = ToolSet.from_request(req.tools, req.tool_choice, req.functions, req.function_call, req.parallel_tool_calls)
    grammar = await compile_output(state.grammars, output_spec(req, toolset))
    try:
        prompt_ids = state.tokenizer.encode_chat(render_messages(req.messages, toolset))
    except ChatTemplateError as e:
        raise bad_request(f"The chat template rejected these messages: {e}", "messages") from None
    params = req.to_sampling_params(state.tokenizer.vocab_size, len(prompt_ids), state.context_length, state.limits, grammar,
                                    budget)
    return PreparedChat(prompt_ids, params, toolset if toolset is not None and toolset.mode != "none" else None)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req: ChatCompletionRequest = await parse(request, ChatCompletionRequest)
    model = check_model(state, req.model)
    prep = await prepare_chat(state, req, token_budget(request))
    n = req.n or 1
    reserved = await reserve_tokens(request, len(prep.prompt_ids) + prep.params.max_tokens * n)
    seqs = make_sequences(prep.prompt_ids, prep.params, n, state.tokenizer, state.context_length)
    job = submit(state.scheduler, seqs)
    answer = ChatAnswer(state, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, len(prep.prompt_ids), bool(req.logprobs),
                        prep.toolset)
    if req.stream:
        return await stream_chat(request, state, job, seqs, answer, req, reserved)
    await run_to_end(job, request, state.scheduler, state.metrics)
    body = answer.completion(seqs)
    await finish_chat(request, req, body, reserved, seqs)
    return web.json_response(text=body.model_dump_json())


@dataclass
class ChatAnswer:
    """How one chat request's sequences become OpenAI's shapes: content, tool calls (when tools
    were offered), finish reasons."""

    state: OracleState
    ident: str
    created: int
    model: str
    prompt_len: int
    logprobs: bool
    toolset: ToolSet | None

    def finish_reason(self, seq: Sequence, called: bool) -> str | None:
        if seq.finish_reason not in ("stop", "length"):
            return None
        if called and seq.finish_reason == "stop":
            return "function_call" if self.toolset.legacy else "tool_calls"
        return seq.finish_reason

    def message(self, seq: Sequence, index: int) -> tuple[AssistantMessage, bool]:
        if self.toolset is None:
            return AssistantMessage(content=seq.text), False
        content, calls = parse_calls(seq.text, self.ident, index)
        if not calls:
            return AssistantMessage(content=content), False
        if self.toolset.legacy:
            return AssistantMessage(content=content, function_call=FunctionCall(name=calls[0].name, arguments=calls[0].arguments)), True
        return AssistantMessage(content=content, tool_calls=[ToolCall(**c.as_openai()) for c in calls]), True

    def completion(self, seqs: list[Sequence]) -> ChatCompletion:
        choices = []
        for i, s in enumerate(seqs):
            message, called = self.message(s, i)
            choices.append(ChatChoice(
                index=i, message=message, finish_reason=self.finish_reason(s, called),
                logprobs=choice_logprobs(self.state.tokenizer, content_tokens(s)) if self.logprobs else None,
            ))
        return ChatCompletion(id=self.ident, created=self.created, model=self.model, system_fingerprint=self.state.fingerprint,
                              choices=choices, usage=usage_of(self.prompt_len, seqs))

    def chunk(self, choices, usage=None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.ident, created=self.created, model=self.model,
                                   system_fingerprint=self.state.fingerprint, choices=choices, usage=usage)


async def reserve_tokens(request: web.Request, tokens: int) -> int:
    """Charge the prompt plus the requested completion tokens against the key's TPM up front."""
    state = request.app[STATE]
    if state.rate_limits is not None:
        decision = await state.rate_limits.charge(request["key"], requests=0, tokens=tokens)
        if decision is not None:
            request["ratelimit"] = decision
    return tokens


async def finish_chat(request: web.Request, req: ChatCompletionRequest, body: ChatCompletion, reserved: int,
                      seqs: list[Sequence]) -> None:
    """Settle the token reservation and store the completion (unless store=false or disabled),
    marked if a Scout that computed it has since failed a check (and labelled, so a later failure
    marks it)."""
    state = request.app[STATE]
    key = request["key"]
    await settle_tokens(request, reserved, body.usage.total_tokens)
    wants_store = state.store_by_default if req.store is None else req.store
    if state.completions is None or not wants_store:
        return
    record = {
        "id": body.id, "owner": key.id, "created_ms": int(time.time() * 1000), "completion": body.model_dump(),
        "messages": [m.model_dump(exclude_none=True) for m in req.messages], "metadata": req.metadata or {},
    }
    taint = state.swarm.taint if state.swarm is not None else None
    if taint is not None and (marks := taint.label([s.session for s in seqs], body.id)):
        record["tainted_by"] = marks
    await state.completions.save(record)


def content_tokens(seq: Sequence):
    """The tokens that make up the answer: not a final end-of-sequence token."""
    out = seq.output
    if out and seq.is_stop_token(out[-1].token):
        out = out[:-1]
    return out


async def stream_job(request: web.Request, job, on_event, before=None, after=None) -> web.StreamResponse:
    """SSE around a job: ``before(response)``, then ``on_event(response, index, event)`` per token,
    ``after(response)`` once every choice finished, then ``[DONE]``. A failure mid-stream becomes
    an error event; a client that went away cancels the job."""
    state = request.app[STATE]
    scheduler = state.scheduler
    response = await start_sse(request)
    try:
        if before is not None:
            await before(response)
        async for index, event in job_events(job, request, scheduler, state.metrics):
            await on_event(response, index, event)
        if job.finished and after is not None:
            await after(response)
        await sse(response, "[DONE]")
    except APIError as e:
        await sse_error(response, e)
    except ConnectionError:
        scheduler.cancel(job)
    return response


async def stream_chat(request, state: OracleState, job, seqs, answer: ChatAnswer, req, reserved: int) -> web.StreamResponse:
    streams = [CallStream(answer.ident, i) for i in range(len(seqs))] if answer.toolset is not None else None

    def delta(content: str | None, calls: list[dict]) -> ChunkDelta:
        if not calls:
            return ChunkDelta(content=content)
        if answer.toolset.legacy:  # the deprecated shape: one call, {name, arguments} then {arguments}
            fn = calls[0]["function"]
            return ChunkDelta(content=content, function_call=dict(fn))
        return ChunkDelta(content=content, tool_calls=calls)

    async def before(response):
        for i in range(len(seqs)):
            await sse(response, answer.chunk([ChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))]))

    async def on_event(response, index, event):
        wants = req.logprobs and not seqs[index].is_stop_token(event.choice.token)
        logprobs = choice_logprobs(state.tokenizer, [event.choice]) if wants else None
        text, calls = event.text, []
        if streams is not None:
            text, calls = streams[index].feed(event.text)
            if event.finish_reason:
                text += streams[index].flush()
        # One chunk per tool-call delta: the content before the call rides the first, the logprobs the last.
        pieces = [[call] for call in calls] or [[]]
        for j, piece in enumerate(pieces):
            content, last = (text if j == 0 else "") or (None if piece else text), j == len(pieces) - 1
            if piece or content or (last and logprobs is not None):
                await sse(response, answer.chunk([ChunkChoice(index=index, delta=delta(content, piece),
                                                              logprobs=logprobs if last else None)]))
        if event.finish_reason:
            called = streams is not None and streams[index].calls > 0
            await sse(response, answer.chunk([ChunkChoice(index=index, delta=ChunkDelta(),
                                                          finish_reason=answer.finish_reason(seqs[index], called))]))

    async def after(response):
        # Stored before [DONE], so a client that retrieves it right after the stream finds it.
        await finish_chat(request, req, answer.completion(seqs), reserved, seqs)
        if req.stream_options and req.stream_options.include_usage:
            await sse(response, answer.chunk([], usage_of(answer.prompt_len, seqs)))

    return await stream_job(request, job, on_event, before, after)


# --- legacy completions ------------------------------------------------------------------------


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    req: CompletionRequest = await parse(request, CompletionRequest)
    model = check_model(state, req.model)
    if req.suffix:
        raise not_supported("suffix")
    if req.echo and req.logprobs is not None:
        raise not_supported("logprobs", "logprobs together with echo (prompt logprobs)")
    n = req.n or 1
    best_of = req.best_of or n
    if best_of < n:
        raise bad_request("best_of must be greater than or equal to n", "best_of", "invalid_value")
    if best_of > n and req.stream:
        raise bad_request("best_of cannot be used with stream", "best_of", "invalid_value")
    prompts = req.prompts()
    if not prompts:
        raise bad_request("prompt must not be empty", "prompt", "invalid_value")
    if best_of * len(prompts) > state.limits.max_n:
        raise bad_request(f"n (or best_of) times the number of prompts is limited to {state.limits.max_n}", "n", "invalid_value")
    tok = state.tokenizer
    encoded = []
    for p in prompts:
        ids = tok.encode(p) if isinstance(p, str) else p
        if not ids:
            raise bad_request("prompt must not be empty", "prompt", "invalid_value")
        if any(not 0 <= t < tok.vocab_size for t in ids):
            raise bad_request("prompt contains a token id outside the vocabulary", "prompt", "invalid_value")
        encoded.append(ids)
    groups, all_seqs = [], []
    for ids in encoded:
        params = req.to_sampling_params(tok.vocab_size, len(ids), state.context_length, state.limits)
        seqs = make_sequences(ids, params, best_of, tok, state.context_length)
        groups.append((ids, seqs))
        all_seqs.extend(seqs)
    prompt_tokens = sum(len(ids) for ids in encoded)
    reserved = await reserve_tokens(request, prompt_tokens + sum(s.params.max_tokens for s in all_seqs))
    job = submit(state.scheduler, all_seqs)
    ident = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if req.stream:
        response = await stream_completion(request, state, job, groups, ident, created, model, prompt_tokens, req)
        await settle_tokens(request, reserved, usage_of(prompt_tokens, all_seqs).total_tokens)
        return response
    await run_to_end(job, request, state.scheduler, state.metrics)
    choices = []
    for p_index, (ids, seqs) in enumerate(groups):
        if best_of > n:
            seqs = sorted(seqs, key=lambda s: -sum(c.logprob or 0.0 for c in s.output))[:n]
        for s in seqs:
            prefix = tok.decode(ids) if req.echo else ""
            choices.append(CompletionChoice(
                index=len(choices), text=prefix + s.text, finish_reason=s.finish_reason,
                logprobs=completion_logprobs(tok, content_tokens(s), len(prefix)) if req.logprobs is not None else None,
            ))
    body = Completion(id=ident, created=created, model=model, system_fingerprint=state.fingerprint, choices=choices,
                      usage=usage_of(prompt_tokens, all_seqs))
    await settle_tokens(request, reserved, body.usage.total_tokens)
    return web.json_response(text=body.model_dump_json())


async def settle_tokens(request: web.Request, reserved: int, used: int) -> None:
    state = request.app[STATE]
    if state.rate_limits is not None:
        await state.rate_limits.settle(request["key"], reserved, used)


def completion_logprobs(tok, choices, offset: int) -> CompletionLogprobs:
    tokens, lps, tops, offsets = [], [], [], []
    for c in choices:
        text = tok.token_text(c.token)
        tokens.append(text)
        lps.append(c.logprob)
        tops.append({tok.token_text(t): lp for t, lp in c.top} if c.top else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


async def stream_completion(request, state, job, groups, ident, created, model, prompt_tokens, req) -> web.StreamResponse:
    tok = state.tokenizer
    flat = [(ids, s) for ids, seqs in groups for s in seqs]

    def chunk(choices, usage=None):
        return Completion(id=ident, created=created, model=model, system_fingerprint=state.fingerprint, choices=choices, usage=usage)

    async def before(response):
        if req.echo:
            for i, (ids, _) in enumerate(flat):
                await sse(response, chunk([CompletionChoice(index=i, text=tok.decode(ids), finish_reason=None)]))

    async def on_event(response, index, event):
        wants = req.logprobs is not None and not flat[index][1].is_stop_token(event.choice.token)
        logprobs = completion_logprobs(tok, [event.choice], 0) if wants else None
        if event.text or logprobs is not None or event.finish_reason:
            await sse(response, chunk([CompletionChoice(index=index, text=event.text, logprobs=logprobs, finish_reason=event.finish_reason)]))

    async def after(response):
        if req.stream_options and req.stream_options.include_usage:
            await sse(response, chunk([], usage_of(prompt_tokens, [s for _, s in flat])))

    return await stream_job(request, job, on_event, before, after)


# --- models and health ------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cards = [ModelCard(id=m, created=state.created) for m in state.model_ids]
    return web.json_response(text=ModelList(data=cards).model_dump_json())


async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    name = request.match_info["model"]
    if name not in state.model_ids:
        raise model_not_found(name)
    return web.json_response(text=ModelCard(id=name, created=state.created).model_dump_json())


async def cluster_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if not request["key"].is_admin:
        raise APIError(403, "Cluster status needs an admin key", type="permission_error", code="admin_required")
    sched = state.scheduler
    common = dict(model=state.model_ids[0], n_layers=state.n_layers, running_sequences=sched.running_sequences,
                  waiting_requests=len(sched.waiting), tokens_generated=sched.tokens_generated, steps=sched.steps,
                  speculative=sched.engine.speculation_status())
    if state.swarm is None:
        body = ClusterStatus(mode="local", oracle_peer_id=None, wire_dtype=None, coverage=[1] * state.n_layers, chain=[], local_spans=[(0, state.n_layers)],
                             scouts=[], failovers=0, sessions=len(state.scheduler.engine.pipeline.local.kv.sessions), **common)
    else:
        swarm = state.swarm.status()
        per_token = swarm["data_plane"]["round_trips"] / sched.tokens_generated if sched.tokens_generated else None
        body = ClusterStatus(mode="swarm", **swarm, round_trips_per_token=round(per_token, 3) if per_token else None, **common)
    return web.json_response(text=body.model_dump_json())


async def swarm_info(request: web.Request) -> web.Response:
    """Public: how a Scout joins this Oracle (``shard-scout --oracle-url`` reads it)."""
    state = request.app[STATE]
    control = state.swarm.control if state.swarm is not None else None
    if control is None:
        raise APIError(404, "This Oracle runs no libp2p swarm (serve --swarm)", code="not_found")
    return web.json_response(text=SwarmInfo(peer_id=control.identity.peer_id, multiaddrs=control.node.addrs,
                                            model=state.model_ids[0]).model_dump_json())


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    closing = state.scheduler.closing
    routed = state.swarm is None or state.swarm.ready
    status = "stopping" if closing else "ok" if routed else "no_route"
    body = Health(status=status, model=state.model_ids[0], ready=status == "ok",
                  running_sequences=state.scheduler.running_sequences, waiting_requests=len(state.scheduler.waiting))
    return web.json_response(text=body.model_dump_json(), status=200 if body.ready else 503)


# --- stored chat completions -------------------------------------------------------------------


def completion_store(request: web.Request):
    state = request.app[STATE]
    if state.completions is None:
        raise APIError(404, "Storing completions is disabled on this server", code="not_found")
    key = request["key"]
    return state.completions, (None if key.is_admin else key.id)


def not_found(ident: str) -> APIError:
    return APIError(404, f"No chat completion found with id '{ident}'", param="completion_id", code="not_found")


def stored_view(record: dict) -> StoredCompletion:
    return StoredCompletion(**record["completion"], metadata=record.get("metadata", {}), tainted_by=record.get("tainted_by"))


def page_params(request: web.Request) -> tuple[int, str | None, str]:
    q = request.query
    try:
        limit = int(q.get("limit", "20"))
    except ValueError:
        raise bad_request("limit must be an integer", "limit", "invalid_value") from None
    if not 1 <= limit <= 100:
        raise bad_request("limit must be between 1 and 100", "limit", "invalid_value")
    order = q.get("order", "asc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", "order", "invalid_value")
    return limit, q.get("after"), order


async def list_stored(request: web.Request) -> web.Response:
    store, owner = completion_store(request)
    limit, after, order = page_params(request)
    metadata = {k[len("metadata["):-1]: v for k, v in request.query.items() if k.startswith("metadata[") and k.endswith("]")}
    records, has_more = await store.list(owner, limit=limit, after=after, order=order, model=request.query.get("model"), metadata=metadata)
    data = [stored_view(r) for r in records]
    body = StoredList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None, has_more=has_more)
    return web.json_response(text=body.model_dump_json())


async def get_stored(request: web.Request) -> web.Response:
    store, owner = completion_store(request)
    ident = request.match_info["completion_id"]
    record = await store.get(ident, owner)
    if record is None:
        raise not_found(ident)
    return web.json_response(text=stored_view(record).model_dump_json())


async def update_stored(request: web.Request) -> web.Response:
    store, owner = completion_store(request)
    ident = request.match_info["completion_id"]
    update: MetadataUpdate = await parse(request, MetadataUpdate)
    record = await store.update_metadata(ident, owner, update.metadata or {})
    if record is None:
        raise not_found(ident)
    return web.json_response(text=stored_view(record).model_dump_json())


async def delete_stored(request: web.Request) -> web.Response:
    store, owner = completion_store(request)
    ident = request.match_info["completion_id"]
    if not await store.delete(ident, owner):
        raise not_found(ident)
    return web.json_response(text=Deleted(id=ident, deleted=True).model_dump_json())


async def stored_messages(request: web.Request) -> web.Response:
    store, owner = completion_store(request)
    ident = request.match_info["completion_id"]
    record = await store.get(ident, owner)
    if record is None:
        raise not_found(ident)
    limit, after, order = page_params(request)
    messages = [
        StoredMessage(id=f"{ident}-{i}", role=m["role"], content=ChatMessage(**m).text(), name=m.get("name"),
                      tool_calls=m.get("tool_calls"), tool_call_id=m.get("tool_call_id"), function_call=m.get("function_call"))
        for i, m in enumerate(record["messages"])
    ]
    if order == "desc":
        messages.reverse()
    if after is not None:
        ids = [m.id for m in messages]
        messages = messages[ids.index(after) + 1:] if after in ids else []
    page = messages[:limit]
    body = StoredMessageList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                             has_more=len(messages) > limit)
    return web.json_response(text=body.model_dump_json())
