"""Audits of real traffic with the real model: sessions the Oracle follows are checked forward by
forward (a lie never passes, the Oracle's copy is set back), and a gross lie in a session it does
not follow is recomputed from the session's history on the spot."""

from __future__ import annotations

import torch

from oracle.swarm.history import SessionHistory
from oracle.trust.audit_policy import AuditPolicy
from oracle.trust.health import HealthPolicy, Outcome, PeerHealth
from oracle.trust.plausibility import Plausibility
from oracle.trust.reference import ReferenceModel
from oracle.trust.traffic import TrafficAudit
from oracle.trust.verdicts import Verdicts
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span, SpanRequest

SPAN = (15, 30)


class Setup:
    """A real Span as the Scout on blocks 15..30, the Oracle's blocks 0..15 feeding it, and the audit."""

    def __init__(self, weights, tokenizer, ends, policy: AuditPolicy, probation: int, plausibility: Plausibility | None = None):
        runtime = Runtime.pick("quant", "cpu")
        self.front = Span(weights, 0, SPAN[0], runtime)
        self.scout = Span(weights, *SPAN, Runtime.pick("dense", "cpu"))  # other kernels, fp32 activations: honest
        self.health = PeerHealth(policy=HealthPolicy(probation=probation))
        self.health.record("scout", Outcome.CONNECTED)
        self.audit = TrafficAudit(ReferenceModel(weights, runtime), Verdicts(self.health), "float32", policy,
                                  plausibility, seed=0)
        self.history = SessionHistory()
        self.ends, self.tokenizer = ends, tokenizer

    def step(self, session: str, start: int, rows: torch.Tensor, lie=None) -> tuple[bool, torch.Tensor]:
        r = SpanRequest(session, start, len(rows))
        x = self.front.forward(rows, [r])
        plan = self.audit.expect("scout", SPAN, x, [r])
        out = self.scout.forward(x, [r])
        if lie is not None:
            out = lie(out)
        ok = self.audit.judge(plan, x, out, [r], self.history.replay)
        self.history.record(r, rows)
        return ok, out

    def session(self, name: str, question: str, steps: int, lie_at: int | None = None, lie=None) -> list[bool]:
        rows = self.ends.embed(self.tokenizer.encode_chat([{"role": "user", "content": question}]))
        results, start = [], 0
        for i in range(steps):
            ok, out = self.step(name, start, rows, lie if i == lie_at else None)
            results.append(ok)
            if not ok:
                return results
            start += len(rows)
            rows = self.ends.embed([int(self.ends.logits(out[-1:].float()).argmax())])
        return results


def test_followed_sessions_are_checked_every_forward_and_a_lie_fails(weights, tokenizer, quant_parts):
    s = Setup(weights, tokenizer, quant_parts[2], AuditPolicy(probation=100), probation=100)
    assert s.session("a", "What is the capital of France?", 6) == [True] * 6  # honest, on other kernels
    assert s.health.clean_checks("scout") == 6 and s.health.probation_left("scout") == 94
    length = s.audit.reference.hop(*SPAN).local.kv.length("b")
    results = s.session("b", "Name three colors.", 4, lie_at=2, lie=lambda o: o + torch.randn_like(o) * o.std() * 0.3)
    assert results == [True, True, False]
    assert s.health.trust("scout") == "quarantined"
    reference = s.audit.reference.hop(*SPAN).local.kv
    assert reference.length("b") == len(s.history.chunks["b"][0].rows) + 1 and length == 0  # set back to where the step began
    assert s.audit.taint.report("scout")["sessions"] == []  # everything it served was checked: nothing spoiled
    s.audit.free("b")
    assert reference.length("b") == 0 and "b" not in s.audit.followed


def test_a_gross_lie_in_an_unfollowed_session_is_recomputed_from_history(weights, tokenizer, quant_parts):
    plausibility = Plausibility(min_rows=32)
    s = Setup(weights, tokenizer, quant_parts[2], AuditPolicy(probation=0, floor=0.0, budget=0.0, reprobation=0.0),
              probation=1000, plausibility=plausibility)
    s.session("calibrate", "Tell me about the sea.", 12)  # on probation: followed, verified rows calibrate
    s.health.policy.probation = 0
    s.health.record("scout", Outcome.CONNECTED)  # now trusted, and nothing is followed (share 0)
    assert s.session("quiet", "What is two plus two?", 5) == [True] * 5
    assert "quiet" not in s.audit.followed or not s.audit.followed["quiet"]
    assert s.audit.taint.report("scout") is None
    results = s.session("skipped", "Who wrote Hamlet?", 6, lie_at=3, lie=lambda o: o * 30)  # blown up
    assert results == [True, True, True, False] and s.audit.recomputed == 1
    report = s.audit.taint.report("scout")
    assert set(report["sessions"]) == {"quiet", "skipped"}  # what it served unchecked is tainted
