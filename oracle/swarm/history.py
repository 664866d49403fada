"""Per-session history for replay: each session's inputs to the first block (its embedded
tokens) and how they were fed (prompt chunks, then one token or one verified draft per step).

When a hop's cache is lost, the session is replayed there in the same chunks, so the rebuilt cache
is bit-identical to the lost one (a single prefill of the whole history would differ in the last
bits, enough to flip near-tied tokens later)."""

from __future__ import annotations

from typing import Iterator

import torch

from shard_common.model.span import SpanRequest


def trim_chunks(chunks: list[int], length: int) -> list[int]:
    """The feeding pattern of a session's first ``length`` positions."""
    out, total = [], 0
    for n in chunks:
        if total >= length:
            break
        out.append(min(n, length - total))
        total += out[-1]
    return out


class SessionHistory:
    def __init__(self):
        self.rows: dict[str, torch.Tensor] = {}
        self.chunks: dict[str, list[int]] = {}

    def record(self, request: SpanRequest, rows: torch.Tensor) -> None:
        """``rows`` were fed for ``request`` (positions from ``request.start``)."""
        rows = rows.float()
        before = self.rows.get(request.session)
        self.rows[request.session] = rows if before is None else torch.cat([before[: request.start], rows])
        self.chunks[request.session] = trim_chunks(self.chunks.get(request.session, []), request.start) + [request.n_tokens]

    def replay(self, session: str, length: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(position, rows) of the session's first ``length`` positions, in their original chunks."""
        rows, position = self.rows.get(session), 0
        for n in trim_chunks(self.chunks.get(session, []), length):
            yield position, rows[position:position + n]
            position += n

    def rollback(self, session: str, length: int) -> None:
        if session in self.rows:
            self.rows[session] = self.rows[session][:length]
            self.chunks[session] = trim_chunks(self.chunks[session], length)

    def fork(self, source: str, target: str) -> None:
        if source in self.rows:
            self.rows[target] = self.rows[source]
            self.chunks[target] = list(self.chunks[source])

    def free(self, session: str) -> None:
        self.rows.pop(session, None)
        self.chunks.pop(session, None)
