"""Blocks the Oracle computes itself in place of a Scout (``--fallback-local``): a local span,
shaped like a Scout connection for the runner, but synchronous (it runs on the engine's thread)."""

from __future__ import annotations

from typing import Callable

import torch

from oracle.engine.pipeline import LocalPipeline
from shard_common.cache_ops import apply_cache_ops
from shard_common.model.span import Span, SpanRequest
from shard_common.protocol import CacheOp


class LocalHop(LocalPipeline):
    local = True
    dead = False
    latency_ms = None
    reached = "in-process"  # no address: never part of a chain of Scouts

    def __init__(self, span: Span, peer_id: str | None = None):
        super().__init__(span)
        self.peer_id = peer_id or "oracle-local"

    @property
    def span(self) -> tuple[int, int]:
        return self.local.start, self.local.end

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest], dtype: str = "float32",
                ops: list[CacheOp] | None = None) -> torch.Tensor:
        apply_cache_ops(self.local, ops or [])
        return super().forward(hidden, requests)

    def cache(self, ops: list[CacheOp]) -> None:
        apply_cache_ops(self.local, ops)


LocalFactory = Callable[[int, int], LocalHop]
