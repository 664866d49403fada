"""Speculative decoding: drafters propose tokens, one pass through the blocks scores them all.

A decoding sequence normally feeds one token per step. With a draft of k tokens it feeds k + 1
(its pending token and the draft) in the same step; the target's logits at those k + 1 positions
judge the draft left to right (``SequenceSampler.verify``), the accepted prefix and one more token
(the target's correction, or a bonus token after a fully accepted draft) are emitted, and every
cache is rolled back to the accepted length. Over a chain of Scouts one trip then yields several
tokens. k adapts per sequence to its acceptance, and drafting pauses when it does not pay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from .sampler import SamplingParams

MODES = ("off", "ngram", "scout", "auto")


@dataclass
class Draft:
    tokens: list[int]
    probs: list[torch.Tensor] | None = None  # the drafter's distribution at each token (None: deterministic)


class Drafter(Protocol):
    name: str

    @property
    def available(self) -> bool: ...

    def propose(self, session: str, tokens: list[int], k: int, params: SamplingParams) -> Draft | None:
        """Up to ``k`` tokens likely to follow ``tokens`` (the session's whole context)."""

    def release(self, session: str) -> None:
        """The session finished: forget it."""

    def stats(self) -> dict:
        """Counters for the cluster status."""


class NgramDrafter:
    """Prompt lookup: find the most recent earlier occurrence of the context's last n tokens
    (longest n first) and propose what followed it. No model, no network; pays off when the
    output repeats its input (summaries, edits, code, extraction)."""

    name = "ngram"
    available = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, window: int = 4096):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.window = window

    def release(self, session: str) -> None:
        pass

    def stats(self) -> dict:
        return {}

    def propose(self, session: str, tokens: list[int], k: int, params: SamplingParams | None = None) -> Draft | None:
        return self.lookup(tokens, k)

    def lookup(self, tokens: list[int], k: int) -> Draft | None:
        context = tokens[-self.window:]
        for n in range(min(self.max_ngram, len(context) - 1), self.min_ngram - 1, -1):
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + k]
                    if follow:
                        return Draft(follow)
        return None


@dataclass
class SpeculationStats:
    passes: int = 0  # verification passes
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by verification passes (accepted + one per pass)

    def add(self, other: "SpeculationStats") -> None:
        self.passes += other.passes
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted

    def as_dict(self) -> dict:
        return {"passes": self.passes, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": round(self.accepted / self.drafted, 4) if self.drafted else None,
                "tokens_per_pass": round(self.emitted / self.passes, 3) if self.passes else None}


@dataclass
class SpeculationState:
    """One sequence's adaptive draft length: +2 after a fully accepted draft, down to what was
    accepted + 1 otherwise; after ``patience`` passes accepting under ``min_rate`` of what was
    drafted, drafting pauses for ``pause`` steps."""

    k: int = 4
    k_max: int = 8
    min_rate: float = 0.2
    patience: int = 4
    pause: int = 16
    paused_for: int = 0
    recent: list[float] = field(default_factory=list)
    stats: SpeculationStats = field(default_factory=SpeculationStats)

    def wanted(self) -> int:
        """Draft length for the next step (0: decode plainly)."""
        if self.paused_for > 0:
            self.paused_for -= 1
            return 0
        return self.k

    def update(self, drafted: int, accepted: int, emitted: int) -> None:
        self.stats.passes += 1
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.emitted += emitted
        self.k = min(self.k + 2, self.k_max) if accepted == drafted else max(1, accepted + 1)
        self.recent = (self.recent + [accepted / drafted])[-self.patience:]
        if len(self.recent) == self.patience and sum(self.recent) / self.patience < self.min_rate:
            self.paused_for, self.recent = self.pause, []
