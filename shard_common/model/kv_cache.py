"""Per-session key/value caches for the blocks of one span, under a shared memory budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVBudgetExceeded(RuntimeError):
    """The cache pool cannot hold more tokens without going over its memory budget."""


class UnknownSession(KeyError):
    pass


@dataclass
class SessionCache:
    """Keys and values of one session: ``k``/``v`` are [n_layers, n_kv_heads, capacity, head_dim];
    only the first ``length`` positions are valid."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0
    last_used: float = field(default=0.0)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() * 2


class KVCachePool:
    """Owns every session's cache for one span. Capacity grows in chunks so that a decode step
    writes in place instead of concatenating; the budget counts allocated, not used, bytes."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
        max_length: int,
        chunk_tokens: int = 256,
    ):
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.budget_bytes = budget_bytes
        self.max_length = max_length
        self.chunk_tokens = chunk_tokens
        self.sessions: dict[str, SessionCache] = {}
        self.used_bytes = 0

    def bytes_for(self, capacity: int) -> int:
        per_token = 2 * self.n_layers * self.n_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        return capacity * per_token

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def length(self, session: str) -> int:
        cache = self.sessions.get(session)
        return cache.length if cache is not None else 0

    def reserve(self, session: str, new_tokens: int) -> SessionCache:
        """The session's cache, grown so that ``new_tokens`` more positions fit."""
        cache = self.sessions.get(session)
        length = cache.length if cache is not None else 0
        needed = length + new_tokens
        if needed > self.max_length:
            raise KVBudgetExceeded(f"session {session} would reach {needed} tokens; the context window is {self.max_length}")
        if cache is not None and needed <= cache.capacity:
            return cache
        capacity = min(self.max_length, -(-needed // self.chunk_tokens) * self.chunk_tokens)
        old_bytes = cache.nbytes if cache is not None else 0
        extra = self.bytes_for(capacity) - old_bytes
        if extra > self.free_bytes:
            raise KVBudgetExceeded(
                f"KV cache budget exhausted: session {session} needs {extra} more bytes, "
                f"{self.free_bytes} of {self.budget_bytes} free across {len(self.sessions)} sessions"
            )
        shape = (self.n_layers, self.n_kv_heads, capacity, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if cache is not None:
            k[:, :, :length] = cache.k[:, :, :length]
            v[:, :, :length] = cache.v[:, :, :length]
            cache.k, cache.v = k, v
        else:
            cache = SessionCache(k, v)
            self.sessions[session] = cache
        self.used_bytes += extra
        return cache

    def rollback(self, session: str, length: int) -> None:
        """Forget every position at or after ``length`` (rejected draft tokens, replays)."""
        cache = self.sessions.get(session)
        if cache is None:
            if length == 0:
                return
            raise UnknownSession(session)
        if not 0 <= length <= cache.length:
            raise ValueError(f"cannot roll session {session} back to {length}: it holds {cache.length} positions")
        cache.length = length

    def fork(self, source: str, target: str) -> None:
        """Give ``target`` a copy of ``source``'s cache (n > 1 choices share one prompt prefill)."""
        src = self.sessions.get(source)
        if src is None:
            raise UnknownSession(source)
        self.free(target)
        dst = self.reserve(target, src.length)
        dst.k[:, :, : src.length] = src.k[:, :, : src.length]
        dst.v[:, :, : src.length] = src.v[:, :, : src.length]
        dst.length = src.length

    def free(self, session: str) -> None:
        cache = self.sessions.pop(session, None)
        if cache is not None:
            self.used_bytes -= cache.nbytes

    def expire_idle(self, now: float, idle_seconds: float) -> list[str]:
        stale = [s for s, c in self.sessions.items() if now - c.last_used > idle_seconds]
        for s in stale:
            self.free(s)
        return stale
