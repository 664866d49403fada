"""What the engine needs from "the blocks": today one local span, later a chain of Scouts."""

from __future__ import annotations

from typing import Protocol

import torch

from shard_common.main_thread import Resumable
from shard_common.model.span import Span, SpanRequest


class Pipeline(Protocol):
    def resumable_forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> Resumable[torch.Tensor]:
        """The blocks' output for ``hidden``, yielding wherever it waits on the network."""
        ...

    def depth(self) -> int:
        """How many micro-batches the scheduler keeps in flight through this pipeline."""
        ...

    def rollback(self, session: str, length: int) -> None: ...

    def fork(self, source: str, target: str) -> None: ...

    def free(self, session: str) -> None: ...

    def abort(self) -> None:
        """Called on the event loop at shutdown: make a step that waits on something fail now."""
        ...


class LocalPipeline:
    """All blocks in this process."""

    def __init__(self, span: Span):
        self.local = span

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        return self.local.forward(hidden, requests)

    def resumable_forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> Resumable[torch.Tensor]:
        yield from ()  # never waits
        return self.forward(hidden, requests)

    def depth(self) -> int:
        return 1  # nothing to overlap: every part of a step runs on this thread

    def rollback(self, session: str, length: int) -> None:
        self.local.rollback(session, length)

    def fork(self, source: str, target: str) -> None:
        self.local.kv.fork(source, target)

    def free(self, session: str) -> None:
        self.local.free(session)

    def abort(self) -> None:
        pass  # a local step never waits on anything
