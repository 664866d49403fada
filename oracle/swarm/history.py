"""Per-session history for replay: each session's inputs to the first block (its embedded
tokens) exactly as they were fed: prompt chunks, then one token or one verification pass per
step, rejected draft rows included.

When a hop's cache is lost, the session is replayed there chunk by chunk with the same rows (and
rolled back where drafts were rejected), so every matmul sees the shapes it saw the first time and
the rebuilt cache is bit-identical to the lost one. (A one-row step and the first row of a
two-row verification pass take different kernels and differ in the last bits, enough to flip
near-tied tokens later; measured here.) A session batched with others cannot be reproduced that
exactly: its replay is alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from shard_common.model.span import SpanRequest


@dataclass
class Chunk:
    start: int  # position of the first row
    rows: torch.Tensor  # what was fed, [n, d_model]
    kept: int  # rows still part of the session (the rest were rejected drafts)


class SessionHistory:
    def __init__(self):
        self.chunks: dict[str, list[Chunk]] = {}

    def record(self, request: SpanRequest, rows: torch.Tensor) -> None:
        """``rows`` were fed for ``request`` (positions from ``request.start``)."""
        self.rollback(request.session, request.start)
        # A copy: a view would keep the whole step's batch alive for as long as this session lives.
        self.chunks.setdefault(request.session, []).append(Chunk(request.start, rows.float().clone(), request.n_tokens))

    def replay(self, session: str, length: int) -> Iterator[tuple[int, torch.Tensor, int]]:
        """(position, rows as fed, how many of them to keep) for the session's first ``length``
        positions."""
        for c in self.chunks.get(session, []):
            if c.start >= length:
                return
            yield c.start, c.rows, min(c.kept, length - c.start)

    def rollback(self, session: str, length: int) -> None:
        chunks = self.chunks.get(session)
        if not chunks:
            return
        while chunks and chunks[-1].start >= length:
            chunks.pop()
        if chunks and chunks[-1].start + chunks[-1].kept > length:
            chunks[-1] = Chunk(chunks[-1].start, chunks[-1].rows, length - chunks[-1].start)

    def fork(self, source: str, target: str) -> None:
        if source in self.chunks:
            self.chunks[target] = list(self.chunks[source])

    def free(self, session: str) -> None:
        self.chunks.pop(session, None)
