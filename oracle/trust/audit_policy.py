"""How much of a Scout's real traffic the Oracle checks: pure functions over plain numbers.

A Scout that corrupts a fraction p of its forwards while a fraction r of them is checked is caught
after ~1/(r·p) forwards, and ~1/r corrupted forwards reach clients meanwhile, whatever p is. So a
newcomer is checked on every session it starts until it has passed ``probation`` checked forwards
(a liar at 5% is caught within ~20 of them with nothing delivered), and afterwards the share of its
sessions followed falls fast as its clean record grows (with the square of probation / clean
checks), never below ``floor``, and rises again whenever the Oracle's audit work leaves room in
its ``budget``. A followed session is checked on every step it takes part in, and a decode step
costs the Oracle about the same for one row as for many, so what auditing costs is the share of
steps that carry any followed session: with b sessions a step, 1 - (1 - share)^b. A trusted Scout goes back on probation at
random moments (``reprobation``), so turning liar once trusted is caught like lying from the start.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuditPolicy:
    probation: int = 200  # checked forwards a Scout must pass after each connection
    floor: float = 0.02  # least share of a trusted Scout's sessions followed
    budget: float = 0.03  # share of the Oracle's engine time audits may use above the floor
    reprobation: float = 0.0005  # chance per forward that a trusted Scout goes back on probation
    reprobation_forwards: int = 50


def follow_share(policy: AuditPolicy, probation_left: int, clean_checks: int, audit_share: float) -> float:
    """The chance that a session a Scout starts now is followed (every forward checked).

    ``clean_checks``: checked forwards it has passed; ``audit_share``: the share of the Oracle's
    recent engine time spent on audits."""
    if probation_left > 0:
        return 1.0
    # 1 at the end of probation, a quarter at twice as many clean checks, 4% at five times.
    earned = (policy.probation / max(clean_checks, policy.probation, 1)) ** 2
    spare = max(0.0, 1.0 - audit_share / policy.budget) if policy.budget > 0 else 0.0
    return min(1.0, max(policy.floor, earned, spare))
