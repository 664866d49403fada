"""Every session's keys and values for the blocks of one span: one paged pool under a memory budget.

The pool keeps one ``PageStore`` per kind of block (full attention; sliding window), and hands
each session pages of it as it grows. Because every session's positions live in the same
tensors, one gather reads the keys of all the sessions in a batch and one matmul pair attends
them all (``kv_batch.py``, ``layers.Block.attention``): the work per step no longer grows with
the number of sessions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class KVBudgetExceeded(RuntimeError):
    """The cache pool cannot hold more tokens without going over its memory budget."""


class UnknownSession(KeyError):
    pass


PAGE_TOKENS = 16
# Positions a sliding-window block keeps beyond its window, so that rollbacks (rejected drafts:
# at most 8 positions; a shared prefill: 1) find the positions before them still there.
ROLLBACK_SLACK = 64
INITIAL_PAGES = 16


class PageStore:
    """Keys and values of the blocks of one kind, for every session: ``k``/``v`` are
    [n_layers, n_kv_heads, slots, head_dim]; a page is ``page`` consecutive slots. Page 0 is never
    handed out and stays zero: padded reads point at it, so a masked-out key is 0, never garbage
    (0 times a NaN left in unused memory would still be a NaN)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, page: int,
                 budget_bytes: int):
        self.page = page
        self._shape = (n_layers, n_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.page_bytes = 2 * n_layers * n_kv_heads * head_dim * page * torch.finfo(dtype).bits // 8
        # Doubling stops at the budget (and the zero page): a store never holds much more than
        # its sessions may use, which matters on a GPU.
        self.max_pages = budget_bytes // self.page_bytes + 1
        self._allocate(min(INITIAL_PAGES, self.max_pages))

    def _allocate(self, pages: int) -> None:
        n_layers, n_kv_heads, head_dim = self._shape
        shape = (n_layers, n_kv_heads, pages * self.page, head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.free_pages = list(range(pages - 1, 0, -1))  # popped from the end: low pages first

    @property
    def pages(self) -> int:
        return self.k.shape[2] // self.page

    def take(self, n: int) -> list[int]:
        if n > len(self.free_pages):
            self._grow(n)
        return [self.free_pages.pop() for _ in range(n)]

    def _grow(self, n: int) -> None:
        """Double (at least): a copy of everything held, as rare as a vector's growth."""
        needed = self.pages + n - len(self.free_pages)
        old, pages = self.pages, max(needed, min(2 * self.pages, self.max_pages))
        k, v = self.k, self.v
        n_layers, n_kv_heads, head_dim = self._shape
        shape = (n_layers, n_kv_heads, pages * self.page, head_dim)
        # Zeros, not empty memory: a single session's keys are read as a view that runs past its
        # last position into masked-out slots, which must hold finite values.
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.k[:, :, : k.shape[2]] = k
        self.v[:, :, : v.shape[2]] = v
        self.free_pages[:0] = range(pages - 1, old - 1, -1)

    def give_back(self, pages: list[int]) -> None:
        self.free_pages.extend(pages)

    def reset(self) -> None:
        """No session holds anything: give back what a burst made the store grow to."""
        if self.pages > INITIAL_PAGES:
            self._allocate(min(INITIAL_PAGES, self.max_pages))

    def slots(self, pages: list[int]) -> torch.Tensor:
        """The slots of ``pages``, in order."""
        return (torch.tensor(pages, dtype=torch.long)[:, None] * self.page + torch.arange(self.page)).flatten()


@dataclass
class SessionCache:
    """One session's share of the pool. Per store: ``pages`` maps each logical page (positions
    ``j * page ..``) to its physical page, 0 where a sliding-window store has let it go (positions
    no window will look at again); ``slots`` holds the slot of every position up to the capacity,
    so a read of positions ``a..b`` is a slice of it. ``high`` is the highest position ever
    written plus one (after a rollback, ``length`` is lower)."""

    pages: list[list[int]]
    slots: list[torch.Tensor]
    dropped: list[int]  # per store: how many leading logical pages were let go
    length: int = 0
    high: int = 0
    last_used: float = field(default=0.0)

    def held(self) -> list[list[int]]:
        return [pages[d:] for pages, d in zip(self.pages, self.dropped)]


class KVCachePool:
    """Owns every session's cache for one span. The budget counts pages held by sessions.
    ``windows`` gives each block's sliding window (0: full attention); blocks with one keep only
    their last window + ``ROLLBACK_SLACK`` positions (pages before that go back to the store)."""

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        budget_bytes: int,
        max_length: int,
        page_tokens: int = PAGE_TOKENS,
        windows: list[int] | None = None,
    ):
        self.n_layers = n_layers
        self.dtype = dtype
        self.device = device
        self.budget_bytes = budget_bytes
        self.max_length = max_length
        self.page = page_tokens
        windows = windows or [0] * n_layers
        # A window no smaller than the context is no window: such blocks keep everything.
        ringed = [0 < w and w + ROLLBACK_SLACK < max_length for w in windows]
        self.ring = max((w for w, r in zip(windows, ringed) if r), default=-ROLLBACK_SLACK) + ROLLBACK_SLACK
        kinds = sorted(set(ringed))  # False (full) first
        self.ringed = kinds
        counts = {kind: 0 for kind in kinds}
        self.layers: list[tuple[int, int]] = []  # per span block: (store, layer within the store)
        for r in ringed:
            self.layers.append((kinds.index(r), counts[r]))
            counts[r] += 1
        self.stores = [PageStore(counts[kind], n_kv_heads, head_dim, dtype, device, page_tokens, budget_bytes) for kind in kinds]
        self.sessions: dict[str, SessionCache] = {}
        self.used_bytes = 0

    def _pages_for(self, positions: int, ringed: bool) -> int:
        pages = -(-positions // self.page)
        # A ring's positions [high - ring, high) touch at most this many pages.
        return min(pages, -(-self.ring // self.page) + 1) if ringed else pages

    def bytes_for(self, capacity: int) -> int:
        """A session's bytes at ``capacity`` positions: its full blocks grow with it, its
        sliding-window blocks up to their ring and no further."""
        return sum(self._pages_for(capacity, r) * s.page_bytes for r, s in zip(self.ringed, self.stores))

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
        want = -(-needed // self.page)
        have = [len(p) for p in cache.pages] if cache is not None else [0] * len(self.stores)
        extra = sum(max(0, want - h) * s.page_bytes for h, s in zip(have, self.stores))
        if extra > self.free_bytes:
            raise KVBudgetExceeded(
                f"KV cache budget exhausted: session {session} needs {extra} more bytes, "
                f"{self.free_bytes} of {self.budget_bytes} free across {len(self.sessions)} sessions"
            )
        if cache is None:
            cache = self.sessions[session] = SessionCache([[] for _ in self.stores], [torch.empty(0, dtype=torch.long)] * len(self.stores),
                                                         [0] * len(self.stores))
        for i, store in enumerate(self.stores):
            if want > have[i]:
                pages = store.take(want - have[i])
                cache.pages[i].extend(pages)
                cache.slots[i] = torch.cat([cache.slots[i], store.slots(pages)])
        self.used_bytes += extra
        return cache

    def advance(self, cache: SessionCache, end: int) -> None:
        """A forward wrote positions up to ``end``: the session's new length. Sliding-window
        stores let go of the pages wholly before the ring."""
        cache.length = end
        cache.high = max(cache.high, end)
        for i, (ringed, store) in enumerate(zip(self.ringed, self.stores)):
            if not ringed:
                continue
            keep_from = max(0, cache.high - self.ring) // self.page
            if keep_from > cache.dropped[i]:
                pages = cache.pages[i][cache.dropped[i]:keep_from]
                store.give_back(pages)
                cache.pages[i][cache.dropped[i]:keep_from] = [0] * len(pages)
                cache.dropped[i] = keep_from
                self.used_bytes -= len(pages) * store.page_bytes

    def rollback(self, session: str, length: int) -> None:
        """Forget every position at or after ``length`` (rejected draft tokens, replays), or the
        whole session where its sliding-window blocks cannot go back that far."""
        cache = self.sessions.get(session)
        if cache is None:
            if length == 0:
                return
            raise UnknownSession(session)
        if not 0 <= length <= cache.length:
            raise ValueError(f"cannot roll session {session} back to {length}: it holds {cache.length} positions")
        kept_from = max((d * self.page for r, d in zip(self.ringed, cache.dropped) if r), default=0)
        if max(0, length - (self.ring - ROLLBACK_SLACK) + 1) < kept_from:
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
        held = src.held()
        needed = sum(len(p) * s.page_bytes for p, s in zip(held, self.stores))
        if needed > self.free_bytes:
            raise KVBudgetExceeded(f"KV cache budget exhausted: forking {source} needs {needed} bytes, "
                                   f"{self.free_bytes} of {self.budget_bytes} free across {len(self.sessions)} sessions")
        copy = SessionCache([], [], list(src.dropped), length=src.length, high=src.high)
        for store, pages, dropped in zip(self.stores, held, src.dropped):
            new = store.take(len(pages))
            if pages:
                into, out_of = store.slots(new).to(store.device), store.slots(pages).to(store.device)
                store.k.index_copy_(2, into, store.k.index_select(2, out_of))
                store.v.index_copy_(2, into, store.v.index_select(2, out_of))
            copy.pages.append([0] * dropped + new)
            copy.slots.append(torch.cat([torch.zeros(dropped * self.page, dtype=torch.long), store.slots(new)]))
        self.sessions[target] = copy
        self.used_bytes += needed

    def free(self, session: str) -> None:
        cache = self.sessions.pop(session, None)
        if cache is None:
            return
        for store, pages in zip(self.stores, cache.held()):
            store.give_back(pages)
            self.used_bytes -= len(pages) * store.page_bytes
        if not self.sessions:
            for store in self.stores:
                store.reset()

    def expire_idle(self, now: float, idle_seconds: float) -> list[str]:
        stale = [s for s, c in self.sessions.items() if now - c.last_used > idle_seconds]
        for s in stale:
            self.free(s)
        return stale
