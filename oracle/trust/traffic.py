"""Audits on real traffic: the Oracle follows a sample of the sessions each Scout carries with its
own copy of the Scout's blocks and checks every forward of a followed session before its output
is used. Which sessions are followed is decided when a session starts on a Scout, by
audit_policy.py (all of them on probation); nothing on the wire differs, so a Scout cannot tell.

A forward of a session that is not followed still passes plausibility.py; a suspicious one is
recomputed at once (the session's history is replayed through the Oracle's blocks, after which the
session stays followed) before its token is sampled.

Runs on the engine's thread, inside the step: ``expect`` while the Scout computes (the Oracle's
work overlaps the Scout's), ``judge`` once its answer is in.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from shard_common.model.kv_cache import KVBudgetExceeded
from shard_common.model.span import SpanRequest
from shard_common.wire import through_wire

from .audit_policy import AuditPolicy, follow_share
from .health import PeerHealth
from .plausibility import Plausibility
from .reference import ReferenceModel
from .taint import TaintLedger
from .verdicts import Verdicts, relative_error

# (position, rows as fed to block 0, rows kept) for a session's first positions: the runner's history.
Replay = Callable[[str, int], Iterator[tuple[int, torch.Tensor, int]]]


class AuditClock:
    """The share of recent wall time spent auditing (an exponentially decaying sum)."""

    def __init__(self, horizon_seconds: float = 10.0):
        self.horizon = horizon_seconds
        self._busy = 0.0
        self._at = time.monotonic()

    def _decay(self) -> None:
        now = time.monotonic()
        self._busy *= math.exp(-(now - self._at) / self.horizon)
        self._at = now

    def add(self, seconds: float) -> None:
        self._decay()
        self._busy += seconds

    def share(self) -> float:
        self._decay()
        return min(1.0, self._busy / self.horizon)


@dataclass
class Expectation:
    peer: str
    span: tuple[int, int]
    expected: dict[int, torch.Tensor]  # request index → the right output (as it should arrive)


class TrafficAudit:
    def __init__(self, reference: ReferenceModel, verdicts: Verdicts, wire_dtype: str, policy: AuditPolicy | None = None,
                 plausibility: Plausibility | None = None, seed: int | None = None):
        self.reference = reference
        self.verdicts = verdicts
        self.health: PeerHealth = verdicts.health
        self.wire_dtype = wire_dtype
        self.policy = policy or AuditPolicy()
        self.plausibility = plausibility or Plausibility()
        self.taint: TaintLedger = verdicts.taint
        self.clock = AuditClock()
        self.followed: dict[str, set[tuple[int, int]]] = {}  # session → spans where it is followed
        self._random = random.Random(seed)
        self.started = self.followed_sessions = self.recomputed = 0

    def _wire(self, x: torch.Tensor) -> torch.Tensor:
        return through_wire(x, self.wire_dtype)

    def expect(self, peer: str, span: tuple[int, int], x: torch.Tensor, requests: list[SpanRequest]) -> Expectation:
        """Before ``peer`` answers: decide whether sessions starting now are followed, and compute
        the right output of every followed one."""
        if not self.health.audited(peer):
            return Expectation(peer, span, {})
        t0 = time.monotonic()
        mirror = self.reference.hop(*span)
        self._maybe_reprobate(peer)
        share = follow_share(self.policy, self.health.probation_left(peer), self.health.clean_checks(peer), self.clock.share())
        for r in requests:
            if r.start == 0:
                self.started += 1
                self._forget(r.session, span)
                if self._random.random() < share:
                    self._follow(r.session, span)
                    self.followed_sessions += 1
        offsets = list(itertools.accumulate((r.n_tokens for r in requests), initial=0))
        checked = [i for i, r in enumerate(requests)
                   if span in self.followed.get(r.session, ()) and mirror.local.kv.length(r.session) == r.start]
        expected: dict[int, torch.Tensor] = {}
        if checked:
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in checked])
            try:
                # Judged on what it received and what it could send: the wire's rounding both ways.
                out = self._wire(mirror.forward(self._wire(x[rows]), [requests[i] for i in checked]))
            except KVBudgetExceeded:  # the Oracle's copy is full: these sessions go unfollowed
                for i in checked:
                    self._forget(requests[i].session, span)
            else:
                at = 0
                for i in checked:
                    expected[i] = out[at:at + requests[i].n_tokens]
                    at += requests[i].n_tokens
        self.clock.add(time.monotonic() - t0)
        return Expectation(peer, span, expected)

    def checks(self, peer: str, span: tuple[int, int], requests: list[SpanRequest]) -> bool:
        """Whether a forward of ``requests`` on ``peer`` is to be checked, so the Oracle must see
        its input and output (the hub path): when the Scout is on probation, a session starts there
        (whether it is followed is decided then), or one of them is followed there. Otherwise it may
        travel a chain of Scouts, where ``review`` judges it (it still counts towards a random
        re-probation)."""
        if not self.health.audited(peer):
            return False
        self._maybe_reprobate(peer)
        return bool(self.health.probation_left(peer)) or any(r.start == 0 or span in self.followed.get(r.session, ())
                                                                for r in requests)

    def _maybe_reprobate(self, peer: str) -> None:
        """Per forward, a small chance that a trusted Scout goes back on probation."""
        if self.health.probation_left(peer) == 0 and self._random.random() < self.policy.reprobation:
            self.health.start_probation(peer, self.policy.reprobation_forwards)

    def review(self, peer: str, span: tuple[int, int], x: torch.Tensor, out: torch.Tensor, requests: list[SpanRequest],
               replay: Replay) -> bool:
        """Whether a forward nothing was followed in (a hop of a chain) may be used: ``judge``
        without an expectation (plausibility, a suspicious output recomputed, what it served unchecked)."""
        return self.judge(Expectation(peer, span, {}), x, out, requests, replay)

    def judge(self, plan: Expectation, x: torch.Tensor, out: torch.Tensor, requests: list[SpanRequest], replay: Replay) -> bool:
        """Whether ``out`` (what the Scout answered) may be used. A failed check is a verdict (the
        Scout is quarantined); the followed sessions' copies are set back to where the step began."""
        peer, span = plan.peer, plan.span
        if not self.health.audited(peer):
            return True
        t0 = time.monotonic()
        offsets = list(itertools.accumulate((r.n_tokens for r in requests), initial=0))
        expected = dict(plan.expected)
        try:
            # Outputs of this forward are used only if it passes, so only what it carried unchecked
            # before can be spoiled; a failure below taints every such session it served.
            self.taint.served(peer, [r.session for r in requests if span not in self.followed.get(r.session, ())])
            suspects = 0
            for i, r in enumerate(requests):
                if i not in expected and self.plausibility.suspicious(span, out[offsets[i]:offsets[i + 1]]):
                    suspects += 1
                    recomputed = self._recompute(span, x[offsets[i]:offsets[i + 1]], r, replay)
                    if recomputed is not None:
                        expected[i] = recomputed
            if not expected:
                return True
            errors = {i: relative_error(out[offsets[i]:offsets[i + 1]], e) for i, e in expected.items()}
            worst = max(errors, key=errors.get)
            passed = self.verdicts.judge(peer, span, errors[worst], "recomputed" if suspects and worst not in plan.expected else "mirror",
                                         {"tokens": requests[worst].n_tokens, "position": requests[worst].start})
            if passed:
                self.plausibility.learn(span, torch.cat([out[offsets[i]:offsets[i + 1]] for i in expected]))
            else:
                mirror = self.reference.hop(*span)
                for i in expected:
                    if mirror.local.kv.length(requests[i].session) > requests[i].start:
                        mirror.rollback(requests[i].session, requests[i].start)
            return passed
        finally:
            self.clock.add(time.monotonic() - t0)

    def _recompute(self, span: tuple[int, int], x: torch.Tensor, r: SpanRequest, replay: Replay) -> torch.Tensor | None:
        """The right output for ``r`` on ``span`` with its input ``x``, after rebuilding the
        session's state in the Oracle's copy from its history (blocks before the span included)."""
        self.recomputed += 1
        mirror = self.reference.hop(*span)
        before = self.reference.hop(0, span[0]) if span[0] > 0 else None
        scratch = f"{r.session}~audit"
        self._forget(r.session, span)
        try:
            for position, rows, keep in replay(r.session, r.start):
                n = len(rows)
                h = rows
                if before is not None:
                    h = self._wire(before.forward(rows, [SpanRequest(scratch, position, n)]))
                    if keep < n:
                        before.rollback(scratch, position + keep)
                mirror.forward(h, [SpanRequest(r.session, position, n)])
                if keep < n:
                    mirror.rollback(r.session, position + keep)
            if mirror.local.kv.length(r.session) != r.start:
                return None  # the history does not reach this step (a session the runner lost track of)
            out = self._wire(mirror.forward(self._wire(x), [r]))
        except KVBudgetExceeded:
            self._forget(r.session, span)
            return None
        finally:
            if before is not None:
                before.free(scratch)
        self._follow(r.session, span)
        return out

    def _follow(self, session: str, span: tuple[int, int]) -> None:
        self.followed.setdefault(session, set()).add(span)

    def _forget(self, session: str, span: tuple[int, int]) -> None:
        self.followed.get(session, set()).discard(span)
        self.reference.hop(*span).free(session)

    # ---- the runner's cache operations ------------------------------------------------------------

    def rollback(self, session: str, length: int) -> None:
        for hop in self.reference.hops():
            if hop.local.kv.length(session) > length:
                hop.local.rollback(session, length)

    def fork(self, source: str, target: str) -> None:
        for span in self.followed.get(source, ()):
            hop = self.reference.hop(*span)
            if hop.local.kv.length(source):
                hop.fork(source, target)
                self._follow(target, span)

    def free(self, session: str) -> None:
        for hop in self.reference.hops():
            hop.local.free(session)
        self.followed.pop(session, None)

    def status(self) -> dict:
        return {"sessions_started": self.started, "sessions_followed": self.followed_sessions, "recomputed": self.recomputed,
                "audit_share": round(self.clock.share(), 4), "policy": vars(self.policy),
                "plausibility": self.plausibility.status(), "tainted": self.taint.status()}
