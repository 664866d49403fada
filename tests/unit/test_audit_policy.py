"""How much real traffic is checked (pure policy), the plausibility calibration, and the taint
ledger that names what a failed Scout served unverified."""

from __future__ import annotations

import pytest
import torch

from oracle.trust.audit_policy import AuditPolicy, follow_share
from oracle.trust.plausibility import Plausibility
from oracle.trust.taint import TaintLedger

POLICY = AuditPolicy(probation=200, floor=0.02, budget=0.1)


def test_on_probation_every_session_is_followed():
    assert follow_share(POLICY, probation_left=1, clean_checks=10**6, audit_share=1.0) == 1.0


def test_the_share_falls_with_the_square_of_the_clean_record_down_to_the_floor_when_busy():
    busy = 1.0  # audits already use all of the budget: no spare room
    assert follow_share(POLICY, 0, 200, busy) == 1.0
    assert follow_share(POLICY, 0, 400, busy) == 0.25
    assert follow_share(POLICY, 0, 1000, busy) == pytest.approx(0.04)
    assert follow_share(POLICY, 0, 10**6, busy) == 0.02


def test_spare_budget_raises_the_share_and_never_past_one():
    assert follow_share(POLICY, 0, 10**6, audit_share=0.0) == 1.0
    assert follow_share(POLICY, 0, 10**6, audit_share=0.05) == 0.5
    assert follow_share(POLICY, 0, 10**6, audit_share=0.1) == 0.02
    assert follow_share(AuditPolicy(probation=0, floor=0.3, budget=0.0), 0, 0, 0.0) == 0.3


def honest_rows(n: int, generator: torch.Generator) -> torch.Tensor:
    """Hidden states with a few massive channels, as real residual streams have."""
    scale = torch.ones(64)
    scale[:3] = 40.0
    return torch.randn(n, 64, generator=generator) * scale + 5.0


def test_plausibility_judges_only_once_calibrated_and_flags_gross_lies_only():
    g = torch.Generator().manual_seed(0)
    p = Plausibility(min_rows=256, margin=1.0)
    assert not p.suspicious((0, 2), honest_rows(4, g) * 100)  # not calibrated yet: no opinion
    assert p.suspicious((0, 2), torch.full((1, 64), float("nan")))  # never plausible
    for _ in range(10):
        p.learn((0, 2), honest_rows(32, g))
    assert not any(p.suspicious((0, 2), honest_rows(1, g)) for _ in range(200))
    assert p.suspicious((0, 2), honest_rows(1, g) * 20)  # blown up
    assert p.suspicious((0, 2), torch.zeros(1, 64))  # zeroed
    assert not p.suspicious((2, 4), torch.zeros(1, 64))  # another span: not calibrated
    assert p.status()["calibrated_spans"] == [[0, 2]]


def test_a_failure_taints_what_the_scout_served_unverified_and_marks_stored_answers():
    ledger = TaintLedger(limit=3)
    ledger.served("liar", ["a", "b"])
    assert ledger.label(["a"], "chatcmpl-a") == []  # stored before the failure: marked later
    ledger.served("liar", ["c", "d"])  # "a" falls off the list (limit 3)
    ledger.served("honest", ["e"])
    assert ledger.quarantined("liar", "relative error 0.9") == ["b", "c", "d"]
    assert ledger.take_marks() == []  # "a" is no longer listed; b, c, d are not stored yet
    marks = ledger.label(["c"], "chatcmpl-c")  # stored after the failure: stored marked
    assert [m["peer_id"] for m in marks] == ["liar"]
    assert ledger.label(["e"], "chatcmpl-e") == []
    report = ledger.report("liar")
    assert report["sessions"] == ["b", "c", "d"] and report["unlisted"] == 1 and report["completions"] == ["chatcmpl-c"]
    assert ledger.report("honest") is None
    ledger.served("liar2", ["f"])
    ledger.label(["f"], "chatcmpl-f")
    ledger.quarantined("liar2", "x")
    assert [(i, m["peer_id"]) for i, m in ledger.take_marks()] == [("chatcmpl-f", "liar2")]
    assert ledger.take_marks() == []
