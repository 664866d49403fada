"""Each Scout's health and trust, with one owner.

Everything that learns something about a peer tells ``PeerHealth.record`` (a request answered,
timed out or lost; a fresh connection; a golden ticket or a checked forward passed or failed), and
everything that must decide about a peer asks it (``usable``: may it carry client traffic;
``may_connect``: may the swarm hold a connection to it; ``probation_left``: must every session it
starts be followed). The states:

- reachable: a connection is open and answering;
- cooling down: it stopped answering (rather than closing); each retry would cost a session's
  step a whole hop timeout, so it is left alone for a while, doubling while it keeps timing out;
- on probation: every session it starts is followed, each forward checked before it is used, for
  its first forwards after each connection, after a quarantine ends, and at random moments;
- quarantined: it failed a check; no client traffic, only more tickets, until it earns trust back;
- banned: refused on both planes until the ban expires (or an operator lifts it).

Trust verdicts are kept in Redis by the reputation store (atomically, so Oracle replicas agree);
this object holds the last known state, so a Redis hiccup changes nothing here.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from .reputation import ReputationStore

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    CONNECTED = "connected"  # a data-plane connection opened: probation starts
    ANSWERED = "answered"  # a request came back
    TIMED_OUT = "timed_out"  # no answer within the hop timeout (or no handshake): cool down
    LOST = "lost"  # the connection closed or was refused
    TICKET_PASSED = "ticket_passed"
    TICKET_FAILED = "ticket_failed"
    MIRROR_PASSED = "mirror_passed"  # a checked forward (a followed session) matched the Oracle's own computation
    MIRROR_FAILED = "mirror_failed"

    @property
    def verdict(self) -> bool | None:
        """True/False for a check passed/failed, None for everything else."""
        return {Outcome.TICKET_PASSED: True, Outcome.MIRROR_PASSED: True,
                Outcome.TICKET_FAILED: False, Outcome.MIRROR_FAILED: False}.get(self)


@dataclass
class HealthPolicy:
    cooldown_seconds: tuple[float, float] = (10.0, 300.0)  # first pause, longest pause
    probation: int = 0  # checked forwards after each connection (0: none; set when auditing)


@dataclass
class PeerState:
    reachable: bool = False
    trust: str = "active"  # active / quarantined / banned
    ban_until: float = 0.0  # wall clock
    cooldown_until: float = 0.0  # monotonic
    cooldown_length: float = 0.0
    probation: int = 0
    clean_checks: int = 0  # checks passed (tickets and checked forwards) since this Oracle first saw it


class PeerHealth:
    def __init__(self, reputation: ReputationStore | None = None, policy: HealthPolicy | None = None,
                 own: set[str] | None = None):
        self.reputation = reputation
        self.policy = policy or HealthPolicy()
        self.own = frozenset(own or ())  # Scouts this Oracle started itself: its own code on its own machine, never audited
        self._peers: dict[str, PeerState] = {}
        self._lock = threading.Lock()  # verdicts come from the engine's thread too (checks of real traffic)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set = set()

    async def start(self) -> None:
        """Load the reputation kept in Redis (it survives Oracle restarts)."""
        self._loop = asyncio.get_running_loop()
        if self.reputation is None:
            return
        try:
            states = await self.reputation.states()
        except (RedisError, OSError) as e:
            log.warning("reputation not loaded (Redis: %s); Scouts start with a clean slate", e)
            return
        with self._lock:
            for peer, (trust, ban_until) in states.items():
                self._peer(peer).trust, self._peer(peer).ban_until = trust, ban_until

    async def drain(self) -> None:
        """Wait for verdicts still on their way to Redis (bounded: a dead Redis must not hold a stop)."""
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=2.0)

    def _peer(self, peer: str) -> PeerState:
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = PeerState()
        return state

    # ---- questions ------------------------------------------------------------------------------

    def trust(self, peer: str) -> str:
        state = self._peers.get(peer)
        if state is None:
            return "active"
        if state.trust == "banned" and state.ban_until <= time.time():
            return "quarantined"  # probation after a ban: it earns its way back with clean tickets
        return state.trust

    def cooling_down(self, peer: str) -> float:
        """Seconds left of its pause (0: none)."""
        state = self._peers.get(peer)
        return max(0.0, state.cooldown_until - time.monotonic()) if state else 0.0

    def usable(self, peer: str) -> bool:
        """May it carry client traffic now?"""
        return self.trust(peer) == "active" and not self.cooling_down(peer)

    def may_connect(self, peer: str) -> bool:
        """May the swarm hold a connection to it (quarantined peers get tickets over one)?"""
        return self.trust(peer) != "banned" and not self.cooling_down(peer)

    def refusal(self, peer: str) -> str | None:
        """Why the control plane should ignore it (None: no reason)."""
        if self.trust(peer) == "banned":
            return "banned for failing golden tickets (an operator can unban it: POST /v1/scouts/{peer_id}/unban)"
        return None

    def audited(self, peer: str) -> bool:
        return peer not in self.own

    def probation_left(self, peer: str) -> int:
        state = self._peers.get(peer)
        return state.probation if state else 0

    def clean_checks(self, peer: str) -> int:
        state = self._peers.get(peer)
        return state.clean_checks if state else 0

    def status(self, peer: str) -> dict:
        state = self._peers.get(peer, PeerState())
        cooling = self.cooling_down(peer)
        return {"reputation": self.trust(peer), "reachable": state.reachable, "probation_left": state.probation,
                "clean_checks": state.clean_checks, "cooldown_s": round(cooling, 1) if cooling else None}

    # ---- what happened --------------------------------------------------------------------------

    def record(self, peer: str, outcome: Outcome, evidence: dict | None = None) -> None:
        """Hear one outcome. Safe from any thread; verdicts also go to Redis (in the background)."""
        with self._lock:
            state = self._peer(peer)
            if outcome is Outcome.CONNECTED:
                state.reachable = True
                state.probation = 0 if peer in self.own else self.policy.probation
            elif outcome is Outcome.ANSWERED:
                state.reachable = True
                if state.cooldown_length and state.cooldown_until <= time.monotonic():
                    state.cooldown_length = 0.0  # answering again: a later timeout starts from the shortest pause
            elif outcome is Outcome.LOST:
                state.reachable = False
            elif outcome is Outcome.TIMED_OUT:
                state.reachable = False
                shortest, longest = self.policy.cooldown_seconds
                state.cooldown_length = min(longest, max(shortest, 2 * state.cooldown_length))
                state.cooldown_until = time.monotonic() + state.cooldown_length
                log.warning("Scout %s stopped answering; not using it for %.0f s", peer, state.cooldown_length)
            if outcome in (Outcome.MIRROR_PASSED, Outcome.MIRROR_FAILED):
                state.probation = max(0, state.probation - 1)
            if outcome.verdict:
                state.clean_checks += 1
            if outcome.verdict is False and self.trust(peer) == "active":
                # At once, before Redis answers: a failed check must not wait for a round trip.
                state.trust = "quarantined"
                log.warning("Scout %s is quarantined: its sessions move to other Scouts", peer)
        if outcome.verdict is not None and self.reputation is not None and self._loop is not None:
            self._submit(self._remember(peer, outcome.verdict, evidence))

    def start_probation(self, peer: str, forwards: int) -> None:
        """Check its next ``forwards`` forwards (a random re-probation of a trusted Scout)."""
        with self._lock:
            state = self._peer(peer)
            state.probation = max(state.probation, forwards)

    def set_trust(self, peer: str, trust: str) -> None:
        """An operator's decision, already written to Redis (unban, reset)."""
        with self._lock:
            state = self._peer(peer)
            state.trust, state.ban_until = trust, 0.0

    def _submit(self, coro) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            task = self._loop.create_task(coro)
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        else:
            asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _remember(self, peer: str, passed: bool, evidence: dict | None) -> None:
        try:
            trust, ban_until = await self.reputation.record(peer, passed, evidence)
        except (RedisError, OSError) as e:
            log.warning("reputation not recorded for %s (Redis: %s)", peer, e)
            return
        with self._lock:
            state = self._peer(peer)
            before = self.trust(peer)
            state.trust, state.ban_until = trust, ban_until
            after = self.trust(peer)
            if after == "active" and before != "active":  # trusted again: checked from the start again
                state.probation = max(state.probation, self.policy.probation)
        if after != before:
            log.warning("Scout %s is %s%s", peer, after, ": its sessions move to other Scouts" if after != "active" else " again")
