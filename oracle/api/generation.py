"""From a validated request to running sequences, and from their events back to OpenAI shapes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from oracle.engine.grammar import Grammar
from oracle.engine.sampler import SamplingParams, TokenChoice
from oracle.engine.scheduler import GenerationFailed, Job, Overloaded, Scheduler
from oracle.engine.sequence import Sequence, TokenEvent
from shard_common.tokenizer import Tokenizer

from .errors import APIError, bad_request
from .metrics import Metrics, RequestTimer
from .schemas import ChoiceLogprobs, SamplingFields, TokenLogprob, TopLogprob, Usage


@dataclass
class RequestLimits:
    max_n: int = 16
    max_tokens: int | None = None


def sampling_params(
    req: SamplingFields,
    tokenizer: Tokenizer,
    prompt_len: int,
    context_length: int,
    limits: RequestLimits,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    grammar: Grammar | None = None,
) -> SamplingParams:
    room = context_length - prompt_len
    if room <= 0 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens or 1
        raise APIError(
            400,
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="messages", code="context_length_exceeded",
        )
    if limits.max_tokens is not None and max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens is limited to {limits.max_tokens} on this server", "max_tokens", "invalid_value")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < tokenizer.vocab_size:
            raise bad_request(f"logit_bias token id {token} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", "logit_bias", "invalid_value")
        bias[token] = value
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else (limits.max_tokens and min(room, limits.max_tokens) or room),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        seed=req.seed,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        stop=req.stop_list_value(),
        ignore_eos=bool(req.ignore_eos),
        speculative=req.speculative,
        grammar=grammar,
    )


def make_sequences(prompt_ids: list[int], params: SamplingParams, count: int, tokenizer: Tokenizer, context_length: int) -> list[Sequence]:
    """``count`` choices of one prompt; all but the first copy its prefill. Seeded choices get
    seeds seed, seed+1, ... so that n > 1 is reproducible yet the choices differ."""
    seqs: list[Sequence] = []
    for i in range(count):
        p = params if i == 0 or params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
        seqs.append(Sequence(prompt_ids, p, tokenizer, context_length, share_prefill_with=seqs[0] if seqs else None))
    return seqs


def submit(scheduler: Scheduler, seqs: list[Sequence]) -> Job:
    try:
        return scheduler.submit(seqs)
    except Overloaded as e:
        raise APIError(503, f"The server is overloaded: {e}. Retry shortly.", type="server_error", code="overloaded", headers={"Retry-After": "1"}) from e


async def job_events(job: Job, request: web.Request, scheduler: Scheduler, metrics: Metrics | None = None):
    """(choice index, event) until every choice finishes. Cancels the job when the client goes
    away, so its batch slot and caches are freed at the next step. Feeds the latency metrics."""
    timer = RequestTimer(metrics)
    try:
        while not (job.delivered and job.events.empty()):
            try:
                item = await asyncio.wait_for(job.events.get(), timeout=1.0)
            except asyncio.TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    return
                continue
            if isinstance(item, GenerationFailed):
                raise APIError(503, f"Generation failed: {item}", type="server_error", code=item.code, headers={"Retry-After": "5"})
            timer.token(item[0])
            yield item
        timer.done(sum(len(s.prompt_ids) for s in job.seqs[:1]), sum(len(s.output) for s in job.seqs))
    finally:
        if not job.finished:
            scheduler.cancel(job)


async def run_to_end(job: Job, request: web.Request, scheduler: Scheduler, metrics: Metrics | None = None) -> None:
    """Wait for every event of a job that is answered in one piece (not streamed)."""
    async for _ in job_events(job, request, scheduler, metrics):
        pass
    if not job.finished:
        raise APIError(499, "client closed the request", type="server_error")


def chat_logprobs(tokenizer: Tokenizer, choice: TokenChoice) -> TokenLogprob:
    def top(token: int, logprob: float) -> TopLogprob:
        raw = tokenizer.token_bytes(token)
        return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(raw))

    head = top(choice.token, choice.logprob if choice.logprob is not None else 0.0)
    return TokenLogprob(**head.model_dump(), top_logprobs=[top(t, lp) for t, lp in choice.top])


def choice_logprobs(tokenizer: Tokenizer, choices: list[TokenChoice]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[chat_logprobs(tokenizer, c) for c in choices])


def usage_of(prompt_tokens: int, seqs: list[Sequence]) -> Usage:
    completion = sum(len(s.output) for s in seqs)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def visible_events(event: TokenEvent) -> bool:
    return bool(event.text) or event.finish_reason is not None
