"""The Oracle's own copy of the blocks, used to check Scouts: golden tickets' right answers, and
the sessions it follows to check real traffic. Used on the engine's thread only (tensor work stays there)."""

from __future__ import annotations

import torch

from oracle.engine.pipeline import LocalPipeline
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span, SpanRequest
from shard_common.model.weights import ModelWeights
from shard_common.wire import through_wire


class ReferenceModel:
    def __init__(self, weights: ModelWeights, runtime: Runtime, kv_budget_bytes: int = 256 << 20):
        self.weights = weights
        self.runtime = runtime
        self.kv_budget_bytes = kv_budget_bytes
        self._hops: dict[tuple[int, int], LocalPipeline] = {}

    def hop(self, start: int, end: int) -> LocalPipeline:
        """Blocks [start, end) computed here (one per range, built on first use)."""
        hop = self._hops.get((start, end))
        if hop is None:
            hop = self._hops[(start, end)] = LocalPipeline(Span(self.weights, start, end, self.runtime, self.kv_budget_bytes))
        return hop

    def hops(self) -> list[LocalPipeline]:
        return list(self._hops.values())

    @torch.inference_mode()
    def ticket(self, rows: torch.Tensor, span: tuple[int, int], wire_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(the span's input, its right output as it should arrive) for a prompt's embedded ``rows``
        read from scratch, with the wire's rounding applied both ways as the Scout sees it."""
        session, x = "~ticket", rows
        request = [SpanRequest(session, 0, len(rows))]
        try:
            if span[0] > 0:
                x = self.hop(0, span[0]).forward(x, request)
            x = through_wire(x, wire_dtype)
            return x, through_wire(self.hop(*span).forward(x, request), wire_dtype)
        finally:
            for hop in self._hops.values():
                hop.local.free(session)
