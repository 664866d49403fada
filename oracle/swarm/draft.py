"""Draft Scouts as the engine's drafter: a session reserves one draft Scout (the least loaded) for
its lifetime, the Scout's KV cache is kept in step with what the Oracle accepted, and a draft that
does not come back within a short deadline falls back to prompt lookup for that step."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import torch

from oracle.engine.sampler import SamplingParams
from oracle.engine.speculative import Draft, NgramDrafter
from shard_common.main_thread import LoopStopped, wait_on_loop
from shard_common.protocol import Draft as DraftRequest

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
        self.failures = 0

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
        return scout

    def propose(self, session: str, tokens: list[int], k: int, params: SamplingParams) -> Draft | None:
        scout = self._reserve(session)
        if scout is None:
            return self.fallback.lookup(tokens, k)
        start = common_prefix(self.held.get(session, []), tokens)
        start = min(start, len(tokens) - 1)  # always send at least the newest token
        request = DraftRequest(session=session, start=start, tokens=tokens[start:], k=k,
                               temperature=0.0 if params.greedy else params.temperature, top_p=params.top_p, seed=params.seed)
        try:
            drafted = wait_on_loop(self.loop, scout.draft(request, self.deadline_seconds))
        except ScoutError as e:
            self.failures += 1
            log.warning("draft Scout %s did not draft for %s: %s; prompt lookup this step", scout.address.peer_id, session, e)
            self.reserved.pop(session, None)
            self.held.pop(session, None)
            return self.fallback.lookup(tokens, k)
        if not drafted.tokens or len(drafted.tokens) > k or any(not 0 <= t < self.vocab_size for t in drafted.tokens):
            log.warning("draft Scout %s answered with an invalid draft", scout.address.peer_id)
            self.failures += 1
            return self.fallback.lookup(tokens, k)
        # Its cache now holds the context and every drafted token but the last.
        self.held[session] = tokens + drafted.tokens[:-1]
        probs = None
        if drafted.support is not None:
            probs = []
            for ids, p in zip(drafted.support, drafted.probs):
                q = torch.zeros(self.vocab_size)
                q[torch.tensor(ids, dtype=torch.long)] = torch.tensor(p)
                probs.append(q)
        return Draft(drafted.tokens, probs)

    def release(self, session: str) -> None:
        scout = self.reserved.pop(session, None)
        self.held.pop(session, None)
        if scout is not None and not scout.dead:
            try:
                wait_on_loop(self.loop, scout.free(session))
            except (ScoutError, LoopStopped):
                pass  # gone: its caches went with it
