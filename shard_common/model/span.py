"""A contiguous span of transformer blocks with per-session KV caches: what a Scout runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .kv_cache import KVCachePool
from .kv_batch import Entry, KVBatch
from .layers import Block, RotaryTable
from .memory import release_after_build
from .runtime import Runtime
from .weights import ModelWeights


class SessionOutOfStep(ValueError):
    """A forward named a start position that is not where the session's cache ends."""


@dataclass(frozen=True)
class SpanRequest:
    """``n_tokens`` new positions of ``session`` starting at ``start`` (its current length)."""

    session: str
    start: int
    n_tokens: int


class Span:
    """Blocks ``[start, end)``. Input and output hidden states are the fp32 residual stream
    [T, d_model], rows grouped by session in the order of the requests."""

    def __init__(self, weights: ModelWeights, start: int, end: int, runtime: Runtime, kv_budget_bytes: int = 1 << 30):
        config = weights.config
        if not 0 <= start < end <= config.n_layers:
            raise ValueError(f"span [{start}, {end}) is outside the model's {config.n_layers} blocks")
        self.config: ModelConfig = config
        self.start, self.end = start, end
        self.runtime = runtime
        stored = [weights.block(i) for i in range(start, end)]
        self.blocks = [
            Block(config, tensors, runtime.device, runtime.dtype, runtime.dense, i, runtime.native_ops)
            for i, tensors in zip(range(start, end), stored)
        ]
        release_after_build(t for tensors in stored for t in tensors.values())
        # One table per RoPE base (Gemma 3's sliding blocks use another base than its global ones).
        self.ropes = {base: RotaryTable(config.head_dim, base, config.context_length, runtime.dtype, runtime.device)
                      for base in {block.rope_base for block in self.blocks}}
        self.kv = KVCachePool(
            end - start, config.n_kv_heads, config.head_dim, runtime.kv_dtype, runtime.device,
            budget_bytes=kv_budget_bytes, max_length=config.context_length, windows=[b.window for b in self.blocks],
        )

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        total = sum(r.n_tokens for r in requests)
        if hidden.shape != (total, self.config.d_model):
            raise ValueError(f"hidden states have shape {tuple(hidden.shape)}, expected ({total}, {self.config.d_model})")
        for r in requests:
            have = self.kv.length(r.session)
            if r.start != have:
                raise SessionOutOfStep(f"session {r.session}: forward starts at {r.start} but its cache holds {have} positions")
        now = time.monotonic()
        entries = []
        for r in requests:
            cache = self.kv.reserve(r.session, r.n_tokens)
            cache.last_used = now
            entries.append(Entry(cache, r.start, r.n_tokens))
        batch = KVBatch(self.kv, entries, self.config.n_kv_heads, self.config.n_heads // self.config.n_kv_heads, self.runtime.device)
        positions = torch.cat([torch.arange(r.start, r.start + r.n_tokens) for r in requests]).to(self.runtime.device)
        end = max(r.start + r.n_tokens for r in requests)
        tables = {base: rope.lookup(positions, end) for base, rope in self.ropes.items()}
        h = hidden.to(self.runtime.device, torch.float32)
        for layer, block in enumerate(self.blocks):
            h = block(h, layer, *tables[block.rope_base], batch)
        for e in entries:
            self.kv.advance(e.cache, e.start + e.n)
        return h

    def rollback(self, session: str, length: int) -> None:
        self.kv.rollback(session, length)

    def free(self, session: str) -> None:
        self.kv.free(session)
