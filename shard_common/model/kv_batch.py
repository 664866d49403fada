"""What one forward of a span reads and writes in its KV pool: the slots its new positions go
to, and for each kind of block, which keys every row attends — decode rows in groups that one
gather and one matmul pair serve, prefill rows per session."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import KVCachePool, PageStore, SessionCache


def padded_keys(n: int) -> int:
    """How many keys a decode row attending ``n`` keys reads, padded. A session's row then goes
    through the same kernel shapes whatever else is in its batch — matmuls of other widths sum
    in other orders — so its output is bit-identical alone and batched. Above 32, steps of a
    quarter of the octave (64..128 in steps of 16): at most a quarter more keys than needed."""
    if n <= 32:
        return 32
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


@dataclass
class DecodeGroup:
    """Decode rows whose keys pad to the same width ``keys``: ``index`` [rows * keys] slots (padding
    reads the zero page), ``mask`` [n_kv_heads * rows, 1, keys] adds -inf where a row has no key."""

    rows: torch.Tensor | None  # which rows of the forward, None: all of them, in order
    size: int
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
    decode: list[DecodeGroup]
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

    def store(self, layer: int) -> tuple[PageStore, int]:
        """The store block ``layer`` of the span keeps its keys in, and its layer there."""
        i, within = self.pool.layers[layer]
        return self.pool.stores[i], within

    def writes(self, layer: int) -> torch.Tensor:
        return self._writes[self.pool.layers[layer][0]]

    def reads(self, layer: int, window: int) -> Reads:
        key = (self.pool.layers[layer][0], window)
        if key not in self._reads:
            self._reads[key] = self._plan(key[0], window)
        return self._reads[key]

    def _plan(self, store: int, window: int) -> Reads:
        by_width: dict[int, list[tuple[int, torch.Tensor, int | None]]] = {}
        prefill = []
        row = 0
        for e in self.entries:
            end = e.start + e.n
            # A sliding-window block sees the last ``window`` positions (itself included).
            first = max(0, end - window - e.n + 1) if window else 0
            slots = e.cache.slots[store][first:end]
            if e.n == 1:
                width = padded_keys(end - first)
                by_width.setdefault(width, []).append((row, slots, self._run(e.cache.pages[store], first, end, width, store)))
            else:
                prefill.append(PrefillRead(row, e.n, slots.to(self.device), self._prefill_mask(first, e.start, end, window)))
            row += e.n
        decode = [self._group(width, members) for width, members in by_width.items()]
        return Reads(decode, prefill)

    def _run(self, pages: list[int], first: int, end: int, width: int, store: int) -> int | None:
        """The first slot of positions ``first..`` if they and the padding after them are consecutive
        slots of the store (what is past ``end`` is masked out; the store holds only finite values)."""
        page = self.pool.page
        held = pages[first // page:(end - 1) // page + 1]
        start = held[0] * page + first % page
        if held != list(range(held[0], held[0] + len(held))) or start + width > self.pool.stores[store].k.shape[2]:
            return None
        return start

    def _group(self, width: int, members: list[tuple[int, torch.Tensor, int | None]]) -> DecodeGroup:
        index = torch.zeros(len(members), width, dtype=torch.long)
        lengths = torch.tensor([len(slots) for _, slots, _ in members])
        for i, (_, slots, _) in enumerate(members):
            index[i, : len(slots)] = slots
        dtype = self.pool.dtype
        mask = torch.zeros(len(members), 1, width, dtype=dtype).masked_fill_(
            torch.arange(width)[None, None, :] >= lengths[:, None, None], float("-inf"))
        rows = [r for r, _, _ in members]
        in_order = rows == list(range(self.rows))
        return DecodeGroup(None if in_order else torch.tensor(rows, device=self.device), len(members), width,
                           index.flatten().to(self.device), mask.repeat(self.n_kv_heads, 1, 1).to(self.device),
                           members[0][2] if len(members) == 1 else None)

    def _prefill_mask(self, first: int, start: int, end: int, window: int) -> torch.Tensor:
        key_pos = torch.arange(first, end)
        query_pos = torch.arange(start, end)
        mask = key_pos[None, :] <= query_pos[:, None]
        if window:
            mask &= key_pos[None, :] > query_pos[:, None] - window
        return mask.repeat(self.group, 1).to(self.device)
