"""Judging one output against the Oracle's own: the tolerance, the calibration record of honest
errors, and the verdict handed to ``PeerHealth``. Golden tickets and checks of real traffic all judge
through here, so both count the same way."""

from __future__ import annotations

import logging
import time

import torch

from .health import Outcome, PeerHealth
from .taint import TaintLedger

log = logging.getLogger(__name__)


CHECK_NAMES = {"ticket": "golden ticket", "mirror": "check of real traffic", "recomputed": "recomputation of a suspicious forward"}


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.float().cpu(), reference.float().cpu()  # a Scout's answer arrives on the CPU
    return float((output - reference).norm() / reference.norm().clamp_min(1e-12))


class Verdicts:
    def __init__(self, health: PeerHealth, tolerance: float = 0.05, taint: TaintLedger | None = None):
        self.health = health
        self.taint = taint or TaintLedger()  # a failure taints what the Scout served unchecked
        self.tolerance = tolerance  # relative L2 error; honest Scouts measured 0 (same kernels) to 0.012 (fp32 activations)
        self.passed = self.failed = 0
        self.errors: list[float] = []  # relative errors of passed checks (calibration, newest last)

    def judge(self, peer: str, span: tuple[int, int], error: float, check: str, evidence: dict | None = None) -> bool:
        """``check``: "ticket", "mirror" (a forward of a followed session) or "recomputed" (a
        suspicious forward checked on the spot). Returns whether it passed."""
        passed = error <= self.tolerance
        if passed:
            self.passed += 1
            self.errors = (self.errors + [error])[-1000:]
        else:
            self.failed += 1
            evidence = {"time": time.time(), "check": check, "span": list(span), "relative_error": error,
                        "tolerance": self.tolerance, **(evidence or {})}
            log.warning("Scout %s failed a %s check on blocks [%d, %d): relative error %.3g > %.3g",
                        peer, CHECK_NAMES[check], span[0], span[1], error, self.tolerance)
            self.taint.quarantined(peer, f"failed a {CHECK_NAMES[check]} on blocks [{span[0]}, {span[1]}): relative error {error:.3g}")
        if check == "ticket":
            outcome = Outcome.TICKET_PASSED if passed else Outcome.TICKET_FAILED
        else:
            outcome = Outcome.MIRROR_PASSED if passed else Outcome.MIRROR_FAILED
        self.health.record(peer, outcome, None if passed else evidence)
        return passed

    def status(self) -> dict:
        errors = sorted(self.errors)
        return {"passed": self.passed, "failed": self.failed, "tolerance": self.tolerance,
                "honest_error_p50": errors[len(errors) // 2] if errors else None,
                "honest_error_max": errors[-1] if errors else None}
