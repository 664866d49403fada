"""Per-session key/value caches for the blocks of one span, under a shared memory budget."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVBudgetExceeded(RuntimeError):
    """The cache pool cannot hold more tokens without going over its memory budget."""


class UnknownSession(KeyError):
    pass


# Positions a sliding-window block keeps beyond its window, so that rollbacks (rejected drafts:
# at most 8 positions; a shared prefill: 1) find the positions before them still there.
ROLLBACK_SLACK = 64


@dataclass
class SessionCache:
    """Keys and values of one session. Blocks with full attention keep every position:
    ``k``/``v`` are [n_full, n_kv_heads, capacity, head_dim], the first ``length`` valid.
    Sliding-window blocks keep only their last ``ring`` positions, each stored twice (buffer
    index i holds position p with p % ring == i % ring, at i and i + ring) so that any
    ``ring`` consecutive positions are one contiguous slice: attention reads a view, never a
    gathered copy. Until a session outgrows ``ring`` positions its ring buffers grow with it
    like the full ones (nothing wraps yet, no second copy): a short chat costs no more than
    before. ``high`` is the highest position ever written to the ring plus one."""

    k: torch.Tensor
    v: torch.Tensor
    layers: list[tuple[bool, int]]  # per span block: (in the ring?, index in its store)
    ring_k: torch.Tensor | None = None  # [n_sliding, n_kv_heads, up to 2 * ring, head_dim]
    ring_v: torch.Tensor | None = None
    ring: int = 0
    length: int = 0
    high: int = 0
    last_used: float = field(default=0.0)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        ring = self.ring_k.nelement() * self.ring_k.element_size() * 2 if self.ring_k is not None else 0
        return self.k.nelement() * self.k.element_size() * 2 + ring

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ([n_kv_heads, n, head_dim]) at positions ``start``.. and return the
        keys and values of positions ``first``..``start + n`` for attention."""
        ringed, i = self.layers[layer]
        end = start + k.shape[1]
        if not ringed:
            self.k[i, :, start:end] = k
            self.v[i, :, start:end] = v
            return self.k[i, :, first:end], self.v[i, :, first:end]
        ring = self.ring
        if end - first <= ring:
            self._ring_write(i, start, k, v)
            at = first % ring
            return self.ring_k[i, :, at:at + end - first], self.ring_v[i, :, at:at + end - first]
        # A chunk longer than the ring (a long prefill): the window before it, then the chunk
        # itself; the ring keeps the chunk's last positions.
        at = first % ring
        keys = torch.cat([self.ring_k[i, :, at:at + start - first], k], dim=1)
        values = torch.cat([self.ring_v[i, :, at:at + start - first], v], dim=1)
        keep = min(k.shape[1], ring)
        self._ring_write(i, end - keep, k[:, -keep:], v[:, -keep:])
        return keys, values

    def _ring_write(self, i: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        ring, n = self.ring, k.shape[1]
        at = start % ring
        wrapping = self.ring_k.shape[2] == 2 * ring  # else every position so far is below ``ring``: one copy
        for store, new in ((self.ring_k, k), (self.ring_v, v)):
            store[i, :, at:at + n] = new
            if wrapping and at < ring:  # the part in the first copy, mirrored into the second
                store[i, :, ring + at:ring + min(at + n, ring)] = new[:, :ring - at]
            if wrapping and at + n > ring:  # the part that ran into the second copy, mirrored into the first
                store[i, :, :at + n - ring] = new[:, ring - at:]
        self.high = max(self.high, start + n)


class KVCachePool:
    """Owns every session's cache for one span. Capacity grows in chunks so that a decode step
    writes in place instead of concatenating; the budget counts allocated, not used, bytes.
    ``windows`` gives each block's sliding window (0: full attention); blocks with one keep a
    ring of window + ``ROLLBACK_SLACK`` positions instead of the whole context."""

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
        windows: list[int] | None = None,
    ):
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.budget_bytes = budget_bytes
        self.max_length = max_length
        self.chunk_tokens = chunk_tokens
        windows = windows or [0] * n_layers
        # A window no smaller than the context is no window: such blocks keep everything.
        ringed = [0 < w and w + ROLLBACK_SLACK < max_length for w in windows]
        self.ring = max((w for w, r in zip(windows, ringed) if r), default=-ROLLBACK_SLACK) + ROLLBACK_SLACK
        self.layers, counts = [], [0, 0]
        for r in ringed:
            self.layers.append((r, counts[r]))
            counts[r] += 1
        self.n_full, self.n_ringed = counts
        self.sessions: dict[str, SessionCache] = {}
        self.used_bytes = 0

    def _token_bytes(self, layers: int) -> int:
        return 2 * layers * self.n_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def _ring_positions(self, capacity: int) -> int:
        return capacity if capacity <= self.ring else 2 * self.ring

    def bytes_for(self, capacity: int) -> int:
        """A session's bytes at ``capacity`` positions: its full blocks grow with it, its rings
        up to twice their size and no further."""
        return capacity * self._token_bytes(self.n_full) + self._ring_positions(capacity) * self._token_bytes(self.n_ringed)

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
        shape = (self.n_full, self.n_kv_heads, capacity, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        rings = self._grown_rings(cache, capacity)
        if cache is not None:
            k[:, :, :length] = cache.k[:, :, :length]
            v[:, :, :length] = cache.v[:, :, :length]
            cache.k, cache.v = k, v
            cache.ring_k, cache.ring_v = rings
        else:
            cache = SessionCache(k, v, self.layers, *rings, ring=self.ring)
            self.sessions[session] = cache
        self.used_bytes += extra
        return cache

    def _grown_rings(self, cache: SessionCache | None, capacity: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.n_ringed:
            return None, None
        size = self._ring_positions(capacity)
        if cache is not None and cache.ring_k.shape[2] == size:
            return cache.ring_k, cache.ring_v
        shape = (self.n_ringed, self.n_kv_heads, size, self.head_dim)
        grown = torch.empty(shape, dtype=self.dtype, device=self.device), torch.empty(shape, dtype=self.dtype, device=self.device)
        if cache is not None:
            held = cache.ring_k.shape[2]  # below ``ring``: no position has wrapped yet
            for new, old in zip(grown, (cache.ring_k, cache.ring_v)):
                new[:, :, :held] = old
                if size == 2 * self.ring:
                    new[:, :, self.ring:self.ring + held] = old
        return grown

    def rollback(self, session: str, length: int) -> None:
        """Forget every position at or after ``length`` (rejected draft tokens, replays), or the
        whole session where its sliding-window rings cannot go back that far."""
        cache = self.sessions.get(session)
        if cache is None:
            if length == 0:
                return
            raise UnknownSession(session)
        if not 0 <= length <= cache.length:
            raise ValueError(f"cannot roll session {session} back to {length}: it holds {cache.length} positions")
        if cache.ring_k is not None and max(0, length - (self.ring - ROLLBACK_SLACK) + 1) < cache.high - cache.ring:
            # The rings no longer hold the window before ``length`` (a rollback deeper than the
            # slack): forget the whole session. Its next forward from ``length`` is out of step,
            # a clear error the Oracle answers by replaying the session from its history.
            self.free(session)
            return
        cache.length = length

    def fork(self, source: str, target: str) -> None:
        """Give ``target`` a copy of ``source``'s cache (n > 1 choices share one prompt prefill)."""
        src = self.sessions.get(source)
        if src is None:
            raise UnknownSession(source)
        self.free(target)
        if src.nbytes > self.free_bytes:
            raise KVBudgetExceeded(f"KV cache budget exhausted: forking {source} needs {src.nbytes} bytes, "
                                   f"{self.free_bytes} of {self.budget_bytes} free across {len(self.sessions)} sessions")
        # A whole copy: its rings may have wrapped, so positions are not where a fresh cache keeps them.
        self.sessions[target] = SessionCache(
            src.k.clone(), src.v.clone(), src.layers, src.ring_k.clone() if src.ring_k is not None else None,
            src.ring_v.clone() if src.ring_v is not None else None, ring=src.ring, length=src.length, high=src.high)
        self.used_bytes += src.nbytes

    def free(self, session: str) -> None:
        cache = self.sessions.pop(session, None)
        if cache is not None:
            self.used_bytes -= cache.nbytes

    def expire_idle(self, now: float, idle_seconds: float) -> list[str]:
        stale = [s for s, c in self.sessions.items() if now - c.last_used > idle_seconds]
        for s in stale:
            self.free(s)
        return stale
