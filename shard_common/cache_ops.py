"""Applying the KV cache operations of a data-plane request to a span (Scout and Oracle alike)."""

from __future__ import annotations

from shard_common.model.span import Span
from shard_common.protocol import CacheOp


def apply_cache_ops(span: Span, ops: list[CacheOp], sessions: set[str] | None = None) -> None:
    """Rollbacks, forks and frees in the order sent (``sessions``: the ones a connection holds,
    to be freed if it drops)."""
    for op in ops:
        if op.op == "rollback":
            span.rollback(op.session, op.length)
        elif op.op == "fork":
            span.kv.fork(op.session, op.target)
            if sessions is not None:
                sessions.add(op.target)
        else:
            span.free(op.session)
            if sessions is not None:
                sessions.discard(op.session)
