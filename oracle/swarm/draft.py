"""Draft Scouts as the engine's drafter: a session reserves one draft Scout (the least loaded) for
its lifetime, the Scout's KV cache is kept in step with what the Oracle accepted, and a draft that
does not come back within a short deadline falls back to prompt lookup for that step.

Drafting ahead (greedy sessions): the draft Scout drafts one token more than the step asked for,
its guess for the token the Oracle will add after accepting the whole draft. The next draft is
requested at once from that guess, while the Oracle verifies this one over the span Scouts; when
the guess comes true (every draft accepted and the Oracle's own token equal to it) the next
step's draft is already there and the draft Scout's round trip is hidden behind the verification.
Otherwise it is dropped and the step drafts as before."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future
from typing import Callable

import torch

from oracle.engine.sampler import SamplingParams
from oracle.engine.speculative import Draft, NgramDrafter
from shard_common.main_thread import LoopStopped, start_on_loop, wait_for_future, wait_on_loop
from shard_common.protocol import Draft as DraftRequest
from shard_common.protocol import Drafted

from .connection import ScoutConnection, ScoutError

log = logging.getLogger(__name__)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ScoutDrafter:
    name = "scout"

    def __init__(self, scouts: Callable[[], list[ScoutConnection]], loop: asyncio.AbstractEventLoop, vocab_size: int,
                 deadline_seconds: float = 2.0):
        self.scouts = scouts  # live draft Scouts right now
        self.loop = loop
        self.vocab_size = vocab_size
        self.deadline_seconds = deadline_seconds
        self.fallback = NgramDrafter()
        self.reserved: dict[str, ScoutConnection] = {}
        self.held: dict[str, list[int]] = {}  # per session, the tokens the draft Scout's cache holds
        self.ahead: dict[str, tuple[list[int], int, Future]] = {}  # per session: (the context it assumes, k, the draft)
        self.failures = 0
        self.drafted_ahead = 0  # drafts requested ahead of their step
        self.ahead_used = 0  # ... that came true and were used
        # Where a draft's time goes: the engine thread waiting for drafts (not hidden behind a
        # verification), and the draft Scout's own compute for the drafts that came back.
        self.wait_ms = 0.0
        self.drafts = 0
        self.draft_compute_ms = 0.0

    @property
    def available(self) -> bool:
        return bool(self.scouts())

    def _reserve(self, session: str) -> ScoutConnection | None:
        scout = self.reserved.get(session)
        if scout is not None and not scout.dead:
            return scout
        live = self.scouts()
        if not live:
            return None
        load = {id(s): 0 for s in live}
        for s in self.reserved.values():
            if id(s) in load:
                load[id(s)] += 1
        scout = min(live, key=lambda s: load[id(s)])
        self.reserved[session], self.held[session] = scout, []
        self.ahead.pop(session, None)  # drafted ahead by a Scout this session no longer uses
        return scout

    def stats(self) -> dict:
        return {"failures": self.failures, "drafted_ahead": self.drafted_ahead, "ahead_used": self.ahead_used,
                "drafts": self.drafts, "wait_ms": round(self.wait_ms, 1), "draft_compute_ms": round(self.draft_compute_ms, 1)}

    def _waited(self, since: float, drafted: Drafted) -> Drafted:
        self.wait_ms += (time.perf_counter() - since) * 1000
        self.drafts += 1
        self.draft_compute_ms += drafted.compute_ms
        return drafted

    def _request(self, session: str, tokens: list[int], k: int, params: SamplingParams) -> DraftRequest:
        start = common_prefix(self.held.get(session, []), tokens)
        start = min(start, len(tokens) - 1)  # always send at least the newest token
        return DraftRequest(session=session, start=start, tokens=tokens[start:], k=k,
                            temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p, seed=params.seed)

    def _fail(self, scout: ScoutConnection, session: str, why: str) -> None:
        self.failures += 1
        log.warning("draft Scout %s did not draft for %s: %s; prompt lookup this step", scout.address.peer_id, session, why)
        self.reserved.pop(session, None)
        self.held.pop(session, None)
        self.ahead.pop(session, None)

    def _valid(self, drafted: Drafted, k: int) -> bool:
        return bool(drafted.tokens) and len(drafted.tokens) <= k and all(0 <= t < self.vocab_size for t in drafted.tokens)

    def _take_ahead(self, scout: ScoutConnection, session: str, tokens: list[int]) -> Drafted | None:
        """The draft requested ahead for ``session`` if it assumed ``tokens`` (and is valid);
        either way the request is finished first, since it changed what the draft Scout's cache
        holds."""
        assumed, k, future = self.ahead.pop(session, (None, 0, None))
        if future is None:
            return None
        since = time.perf_counter()
        try:
            drafted = self._waited(since, wait_for_future(self.loop, future))
        except ScoutError as e:
            self._fail(scout, session, str(e))
            return None
        self.held[session] = assumed + drafted.tokens[:-1]
        if assumed != tokens or not self._valid(drafted, k):
            return None
        self.ahead_used += 1
        return drafted

    def propose(self, session: str, tokens: list[int], k: int, params: SamplingParams) -> Draft | None:
        scout = self._reserve(session)
        if scout is None:
            return self.fallback.lookup(tokens, k)
        # Greedy: one token more, the guess that lets the next draft start now (see the module doc).
        want = k + 1 if params.greedy else k
        drafted = self._take_ahead(scout, session, tokens)
        if drafted is None:
            if session not in self.reserved:  # the request ahead failed: the Scout was dropped
                return self.fallback.lookup(tokens, k)
            since = time.perf_counter()
            try:
                drafted = self._waited(since, wait_on_loop(
                    self.loop, scout.draft(self._request(session, tokens, want, params), self.deadline_seconds)))
            except ScoutError as e:
                self._fail(scout, session, str(e))
                return self.fallback.lookup(tokens, k)
            # Its cache now holds the context and every drafted token but the last.
            self.held[session] = tokens + drafted.tokens[:-1]
            if not self._valid(drafted, want):
                log.warning("draft Scout %s answered with an invalid draft", scout.address.peer_id)
                self.failures += 1
                return self.fallback.lookup(tokens, k)
        draft_tokens = drafted.tokens[:k]
        if params.greedy and len(drafted.tokens) > k:
            assumed = tokens + drafted.tokens[:k + 1]  # the draft, then the guess
            try:
                future = start_on_loop(self.loop, scout.draft(self._request(session, assumed, want, params), self.deadline_seconds))
            except LoopStopped:
                future = None
            if future is not None:
                self.ahead[session] = (assumed, want, future)
                self.drafted_ahead += 1
        probs = None
        if drafted.support is not None:
            probs = []
            for ids, p in zip(drafted.support[:k], drafted.probs[:k]):
                q = torch.zeros(self.vocab_size)
                q[torch.tensor(ids, dtype=torch.long)] = torch.tensor(p)
                probs.append(q)
        return Draft(draft_tokens, probs)

    def release(self, session: str) -> None:
        scout = self.reserved.pop(session, None)
        self.held.pop(session, None)
        self.ahead.pop(session, None)  # its request finishes before the free below, on the same connection
        if scout is not None and not scout.dead:
            try:
                wait_on_loop(self.loop, scout.free(session))
            except (ScoutError, LoopStopped):
                pass  # gone: its caches went with it
