"""From a validated request to running sequences, and from their events back to OpenAI shapes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from oracle.engine.sampler import SamplingParams, TokenChoice
from oracle.engine.scheduler import GenerationFailed, Job, Overloaded, Scheduler
from oracle.engine.sequence import Sequence, TokenEvent
from shard_common.tokenizer import Tokenizer

from .errors import APIError
from .metrics import Metrics, RequestTimer
from .schemas import ChoiceLogprobs, TokenLogprob, TopLogprob, Usage


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
