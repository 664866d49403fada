"""Probation mirrors: a Scout's first forwards after each connection are recomputed by the
Oracle's own blocks and compared before their output is used, so a Scout that lies from the start
never reaches a client. Runs on the engine's thread, inside the step."""

from __future__ import annotations

import itertools

import torch

from shard_common.model.span import SpanRequest
from shard_common.wire import through_wire

from .reference import ReferenceModel
from .verdicts import Verdicts, relative_error


class ProbationMirror:
    def __init__(self, reference: ReferenceModel, verdicts: Verdicts, wire_dtype: str):
        self.reference = reference
        self.verdicts = verdicts
        self.wire_dtype = wire_dtype

    def check(self, peer: str, span: tuple[int, int], x: torch.Tensor, out: torch.Tensor, requests: list[SpanRequest]) -> bool:
        """Whether ``out`` (what ``peer`` answered for input ``x``) is right. Only sessions the mirror
        has followed from their first position can be checked; with none, it passes unjudged."""
        mirror = self.reference.hop(*span)
        offsets = list(itertools.accumulate((r.n_tokens for r in requests), initial=0))
        picked = [i for i, r in enumerate(requests) if mirror.local.kv.length(r.session) == r.start]
        if not picked:
            return True
        rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in picked])
        # Judge it on what it received and what it could send: the wire's rounding both ways.
        expected = through_wire(mirror.forward(through_wire(x[rows], self.wire_dtype), [requests[i] for i in picked]),
                                self.wire_dtype)
        return self.verdicts.judge(peer, span, relative_error(out[rows], expected), "mirror")

    def forget(self, session: str, length: int = 0) -> None:
        """The session was rolled back to ``length`` (0: freed)."""
        for hop in self.reference.hops():
            if length == 0:
                hop.local.free(session)
            elif hop.local.kv.length(session) > length:
                hop.local.rollback(session, length)
