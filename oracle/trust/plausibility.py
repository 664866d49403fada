"""Cheap per-forward plausibility: does what a Scout sent look like what this span produces?

Calibrated, per span, on outputs the Oracle has verified itself (followed sessions and golden
tickets), so a liar cannot shape the calibration: per channel the running mean and variance of
the span's output; per row the mean squared z-score over channels, and the row's norm. A row whose
score or norm falls outside everything verified so far (by a margin) is suspicious and its forward
is recomputed before its token is sampled; a recomputation that passes widens the range, so an
honest Scout trips it at most briefly. Non-finite values are always suspicious.

What it cannot do, measured on the default model: output of the right scale but wrong (random
noise with the output's own spread) overlaps honest rows (honest z up to e^1.16, half of the
random rows under e^0.97), so it catches gross lies (skipped blocks, blown-up or zeroed outputs,
NaN) and leaves the subtle ones to sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SpanCalibration:
    rows: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None  # sum of squared deviations (Chan et al.'s parallel update)
    std: torch.Tensor | None = None  # per channel, kept with the statistics: every unfollowed forward is scored
    score_max: float = -math.inf
    log_norm: tuple[float, float] = (math.inf, -math.inf)
    pending: list[torch.Tensor] = field(default_factory=list)  # rows kept until there are enough to judge by

    def update(self, rows: torch.Tensor) -> None:
        n = len(rows)
        mean = rows.mean(0)
        m2 = ((rows - mean) ** 2).sum(0)
        if self.mean is None:
            self.rows, self.mean, self.m2 = n, mean, m2
        else:
            total = self.rows + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta ** 2 * (self.rows * n / total)
            self.rows = total
        self.std = (self.m2 / max(1, self.rows - 1)).sqrt().clamp_min(1e-3)

    def score(self, rows: torch.Tensor) -> torch.Tensor:
        return (((rows - self.mean) / self.std) ** 2).mean(1).clamp_min(1e-12).log()


class Plausibility:
    def __init__(self, min_rows: int = 256, margin: float = 1.0):
        self.min_rows = min_rows  # verified rows needed before it judges anything
        self.margin = margin  # in log units, past the widest verified row
        self.spans: dict[tuple[int, int], SpanCalibration] = {}
        self.judged = self.flagged = 0

    def learn(self, span: tuple[int, int], rows: torch.Tensor) -> None:
        """``rows``: verified outputs of ``span`` (the Oracle computed the same within tolerance)."""
        rows = rows.float()
        if not len(rows) or not torch.isfinite(rows).all():
            return
        cal = self.spans.setdefault(span, SpanCalibration())
        cal.update(rows)
        log_norms = rows.norm(dim=1).clamp_min(1e-12).log()
        cal.log_norm = (min(cal.log_norm[0], float(log_norms.min())), max(cal.log_norm[1], float(log_norms.max())))
        if cal.rows < self.min_rows:
            cal.pending.append(rows)
            return
        for past in cal.pending + [rows]:
            cal.score_max = max(cal.score_max, float(cal.score(past).max()))
        cal.pending = []

    def suspicious(self, span: tuple[int, int], rows: torch.Tensor) -> bool:
        rows = rows.float()
        if not torch.isfinite(rows).all():
            self.flagged += 1
            return True
        cal = self.spans.get(span)
        if cal is None or cal.rows < self.min_rows:
            return False
        self.judged += 1
        log_norms = rows.norm(dim=1).clamp_min(1e-12).log()
        odd = (float(log_norms.min()) < cal.log_norm[0] - self.margin or float(log_norms.max()) > cal.log_norm[1] + self.margin
               or float(cal.score(rows).max()) > cal.score_max + self.margin)
        self.flagged += odd
        return odd

    def status(self) -> dict:
        return {"judged": self.judged, "flagged": self.flagged, "calibrated_spans": sorted(list(s) for s, c in self.spans.items() if c.rows >= self.min_rows)}
