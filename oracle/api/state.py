"""What the HTTP layer holds: the tokenizer, the scheduler, the served model names, limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from oracle.engine.scheduler import Scheduler
from shard_common.tokenizer import Tokenizer

from .generation import Limits


@dataclass
class OracleState:
    tokenizer: Tokenizer
    scheduler: Scheduler
    model_ids: list[str]
    context_length: int
    created: int
    fingerprint: str
    limits: Limits = field(default_factory=Limits)
