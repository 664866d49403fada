"""What one forward of a span reads and writes in its KV pool: the slots its new positions go
to, and for each kind of block, which keys every row attends — a session's few new rows (a
decode step, a speculative verification) in groups that one gather and one matmul pair serve,
long prefill chunks per session."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCachePool, PageStore, SessionCache


# A session's forward of at most this many rows (decode: 1; verifying a draft: up to 9) joins a
# group; longer ones (prefill chunks) attend on their own through SDPA, whose memory stays
# bounded where a group's score matrix would grow with rows × keys.
GROUPED_ROWS = 16


def padded_keys(n: int) -> int:
    """How many keys a session's rows attending ``n`` keys read, padded. Its rows then go through
    the same kernel shapes whatever else is in their batch — matmuls of other widths sum
    in other orders — so its output is bit-identical alone and batched. Above 32, steps of a
    quarter of the octave (64..128 in steps of 16): at most a quarter more keys than needed."""
    if n <= 32:
        return 32
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


def allowed_keys(firsts: list[int], starts: list[int], n: int, width: int, window: int) -> torch.Tensor:
    """[sessions, n, width] bool: whether row i of a session (position start + i) may look at key j
    (position first + j) — not past itself, and within its window if it has one."""
    key_pos = torch.tensor(firsts)[:, None, None] + torch.arange(width)[None, None, :]
    query_pos = torch.tensor(starts)[:, None, None] + torch.arange(n)[None, :, None]
    allowed = key_pos <= query_pos
    if window:
        allowed &= key_pos > query_pos - window
    return allowed


@dataclass
class Group:
    """Sessions with ``n`` new rows each whose keys pad to the same width ``keys``: ``index``
    [size * keys] slots (padding reads the zero page), ``mask`` [n_kv_heads * size, n * g, keys]
    adds -inf where a row may not look (past its own position, outside its window, padding)."""

    rows: torch.Tensor | None  # which rows of the forward, None: all of them, in order
    size: int
    n: int
    keys: int
    index: torch.Tensor
    mask: torch.Tensor
    run: int | None = None  # a group of one session whose keys lie in slots run.. run + keys: read as a view


@dataclass
class PrefillRead:
    """A session's ``n`` rows from ``row`` attending slots ``index`` under ``mask`` [g * n, keys]
    (the query heads sharing a KV head stacked along the sequence axis)."""

    row: int
    n: int
    index: torch.Tensor
    mask: torch.Tensor


@dataclass
class Reads:
    groups: list[Group]
    prefill: list[PrefillRead]


@dataclass
class RowKeys:
    """For the native kernels: each row of a session with a few new rows (``rows``) attends the
    slots ``slots[begin[i]:begin[i] + count[i]]``, exactly the positions it may see; no padding
    and no mask, since those kernels compute every row on its own. Prefill chunks as in ``Reads``."""

    rows: torch.Tensor
    slots: torch.Tensor
    begin: torch.Tensor
    count: torch.Tensor
    prefill: list[PrefillRead]


@dataclass(frozen=True)
class Entry:
    cache: SessionCache
    start: int
    n: int


class KVBatch:
    """Built once per forward (after every session's pages are reserved) and handed to each block."""

    def __init__(self, pool: KVCachePool, entries: list[Entry], n_kv_heads: int, group: int, device: torch.device):
        self.pool = pool
        self.entries = entries
        self.n_kv_heads, self.group, self.device = n_kv_heads, group, device
        self.rows = sum(e.n for e in entries)
        self._writes = [
            torch.cat([e.cache.slots[i][e.start:e.start + e.n] for e in entries]).to(device) for i in range(len(pool.stores))
        ]
        self._reads: dict[tuple[int, int], Reads] = {}
        self._row_keys: dict[tuple[int, int], RowKeys] = {}

    def store(self, layer: int) -> tuple[PageStore, int]:
        """The store block ``layer`` of the span keeps its keys in, and its layer there."""
        i, within = self.pool.layers[layer]
        return self.pool.stores[i], within

    def writes(self, layer: int) -> torch.Tensor:
        return self._writes[self.pool.layers[layer][0]]

    def reads(self, layer: int, window: int) -> Reads:
        return self._planned(self._reads, self._plan, layer, window)

    def row_keys(self, layer: int, window: int) -> RowKeys:
        return self._planned(self._row_keys, self._plan_rows, layer, window)

    def _planned(self, plans: dict, plan, layer: int, window: int):
        """Planned once per kind of block (its store and window) and forward, used by every block."""
        key = (self.pool.layers[layer][0], window)
        if key not in plans:
            plans[key] = plan(key[0], window)
        return plans[key]

    @staticmethod
    def _first(e: Entry, window: int) -> int:
        """The first position any of the entry's rows attends: a sliding-window block sees the
        last ``window`` positions (itself included)."""
        return max(0, e.start + 1 - window) if window else 0

    def _prefill_read(self, store: int, e: Entry, row: int, window: int) -> PrefillRead:
        first, end = self._first(e, window), e.start + e.n
        allowed = allowed_keys([first], [e.start], e.n, end - first, window)[0].repeat(self.group, 1)
        return PrefillRead(row, e.n, e.cache.slots[store][first:end].to(self.device), allowed.to(self.device))

    def _plan_rows(self, store: int, window: int) -> RowKeys:
        rows, begin, count, runs, prefill = [], [], [], [], []
        row = taken = 0
        for e in self.entries:
            end, first = e.start + e.n, self._first(e, window)
            if e.n <= GROUPED_ROWS:
                runs.append(e.cache.slots[store][first:end])
                for i in range(e.n):
                    position = e.start + i
                    row_first = max(first, position - window + 1) if window else first
                    rows.append(row + i)
                    begin.append(taken + row_first - first)
                    count.append(position + 1 - row_first)
                taken += end - first
            else:
                prefill.append(self._prefill_read(store, e, row, window))
            row += e.n
        slots = runs[0] if len(runs) == 1 else torch.cat(runs) if runs else torch.empty(0, dtype=torch.long)
        return RowKeys(torch.tensor(rows, dtype=torch.long), slots, torch.tensor(begin, dtype=torch.long),
                       torch.tensor(count, dtype=torch.long), prefill)

    def _plan(self, store: int, window: int) -> Reads:
        by_shape: dict[tuple[int, int], list[tuple[int, Entry, int, int | None]]] = {}
        prefill = []
        row = 0
        for e in self.entries:
            end, first = e.start + e.n, self._first(e, window)
            if e.n <= GROUPED_ROWS:
                width = padded_keys(end - first)
                by_shape.setdefault((e.n, width), []).append((row, e, first, self._run(e.cache.pages[store], first, end, width, store)))
            else:
                prefill.append(self._prefill_read(store, e, row, window))
            row += e.n
        groups = [self._group(store, window, n, width, members) for (n, width), members in by_shape.items()]
        return Reads(groups, prefill)

    def _run(self, pages: list[int], first: int, end: int, width: int, store: int) -> int | None:
        """The first slot of positions ``first..`` if they and the padding after them are consecutive
        slots of the store (what is past ``end`` is masked out; the store holds only finite values)."""
        page = self.pool.page
        held = pages[first // page:(end - 1) // page + 1]
        start = held[0] * page + first % page
        if held != list(range(held[0], held[0] + len(held))) or start + width > self.pool.stores[store].k.shape[2]:
            return None
        return start

    def _group(self, store: int, window: int, n: int, width: int, members: list[tuple[int, Entry, int, int | None]]) -> Group:
        index = torch.zeros(len(members), width, dtype=torch.long)
        for i, (_, e, first, _) in enumerate(members):
            slots = e.cache.slots[store][first:e.start + e.n]
            index[i, : len(slots)] = slots
        # The padding is excluded too: it lies past the last row's position.
        allowed = allowed_keys([first for _, _, first, _ in members], [e.start for _, e, _, _ in members], n, width, window)
        mask = torch.zeros(allowed.shape, dtype=self.pool.dtype).masked_fill_(~allowed, float("-inf"))
        # Rows of a session's matrix are (row, query head of the group): each row's mask g times.
        mask = mask.unsqueeze(2).expand(len(members), n, self.group, width).reshape(len(members), n * self.group, width)
        rows = [r + i for r, _, _, _ in members for i in range(n)]
        in_order = rows == list(range(self.rows))
        return Group(None if in_order else torch.tensor(rows, device=self.device), len(members), n, width,
                     index.flatten().to(self.device), mask.repeat(self.n_kv_heads, 1, 1).to(self.device),
                     members[0][3] if len(members) == 1 else None)
