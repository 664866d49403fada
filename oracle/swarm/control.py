"""The Oracle's control plane: the registry of Scouts heard over gossipsub, span assignment, and
the Oracle's own announcement (who it is, where its shards are, which span each Scout serves)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from shard_common.identity import Identity
from shard_common.p2p.announcements import (
    ORACLE_DHT_KEY, ORACLE_TOPIC, SCOUT_TOPIC, AnnouncementError, OracleAnnouncement, ScoutAnnouncement, decode, encode,
    proof_problem, prove, replayed,
)
from shard_common.p2p.node import P2PConfig, P2PNode

from .addresses import dial_problem, own_networks
from .connection import ScoutAddress
from .placement import Candidate, Span, plan

log = logging.getLogger(__name__)


@dataclass
class ScoutRecord:
    announcement: ScoutAnnouncement
    first_seen: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    dead: bool = False
    refused: str | None = None



@dataclass(frozen=True)
class ServingScout:
    """A Scout to hold a data-plane connection to."""

    peer_id: str
    span: Span | None  # the span it must serve (None: a draft Scout)
    address: ScoutAddress | None  # where the Oracle may dial it; None: it must dial in (see ``unreachable``)
    unreachable: str | None = None


@dataclass
class ModelOffer:
    """What the Oracle asks Scouts to serve."""

    model: str  # shard set id
    model_name: str
    n_layers: int
    block_bytes: int
    shards_url: str | None
    vocab_digest: str | None = None


class OracleControl:
    def __init__(self, identity: Identity, p2p: P2PConfig, offer: ModelOffer, span_limit: int = 0,
                 heartbeat_seconds: float = 1.0, dead_after_seconds: float = 3.0, reprovide_seconds: float = 30.0,
                 swarm_secret: str | None = None, allow_peers: set[str] | None = None,
                 refuse_peer: Callable[[str], str | None] = lambda peer: None, data_port: Callable[[], int] = lambda: 0):
        self.identity = identity
        self.node = P2PNode(identity, p2p)
        self.offer = offer
        self.span_limit = span_limit
        self.heartbeat_seconds = heartbeat_seconds
        self.dead_after_seconds = dead_after_seconds
        self.reprovide_seconds = reprovide_seconds
        self.swarm_secret = swarm_secret  # private swarm: Scouts must prove they know it
        self.allow_peers = allow_peers  # private swarm: only these Scouts
        self.scouts: dict[str, ScoutRecord] = {}
        self.assignments: dict[str, Span] = {}
        self.busy: set[str] = set()  # peers carrying sessions, told by the swarm: moved last
        self.refuse_peer = refuse_peer  # a ban, say: why to ignore a peer
        self.data_port = data_port  # where Scouts behind NAT dial in (0: nowhere)
        self.dial_in: set[str] = set()  # Scouts the swarm cannot reach, told by the swarm: they dial in
        self.networks: list = []  # the networks this machine is on (which Scout addresses may be dialled)
        self._seq = 0
        self._joined = False  # a peer joined since the DHT record was last stored
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def start(self) -> list[str]:
        self.networks = own_networks()
        addrs = await self.node.start({SCOUT_TOPIC: self._on_scout})
        log.warning("Oracle %s on libp2p: %s", self.identity.peer_id, " ".join(addrs))
        self._task = asyncio.get_running_loop().create_task(self._run())
        return addrs

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.node.stop()

    def _on_scout(self, sender: str, data: bytes) -> None:
        try:
            a = decode(ScoutAnnouncement, sender, data)
        except AnnouncementError as e:
            log.warning("ignored announcement: %s", e)
            return
        record = self.scouts.get(sender)
        refusal = self._refusal(a)
        if refusal and (record is None or record.refused != refusal):
            log.warning("refused Scout %s: %s", sender, refusal)
        if record is None or record.dead:
            log.warning("Scout %s joined (%s, %s)", sender, f"data plane on port {a.data_port}" if a.listening else "behind NAT: it dials in",
                        f"serving [{a.span[0]}, {a.span[1]})" if a.span else "no span yet")
            self.scouts[sender] = ScoutRecord(a, refused=refusal)
            self._joined = True
            self._changed.set()
            return
        if replayed(a, record.announcement):
            log.debug("ignored a replayed announcement of Scout %s (seq %d, last %d)", sender, a.seq, record.announcement.seq)
            return
        if (a.state, a.span) != (record.announcement.state, record.announcement.span):
            self._changed.set()
        record.announcement, record.last_seen, record.refused = a, time.monotonic(), refusal

    def _refusal(self, a: ScoutAnnouncement) -> str | None:
        """Why this Scout cannot serve this Oracle (None: it can)."""
        if reason := self.refuse_peer(a.peer_id):
            return reason
        if self.allow_peers is not None and a.peer_id not in self.allow_peers:
            return "it is not in --allow-peers"
        if reason := proof_problem(self.swarm_secret, a):
            return reason
        if a.role == "draft" and a.state == "serving" and a.vocab_digest != self.offer.vocab_digest:
            return (f"its draft model's vocabulary ({a.vocab_digest}) is not this model's ({self.offer.vocab_digest}); "
                    "a drafter must share the target's tokenizer")
        return None

    def _expire(self) -> None:
        now = time.monotonic()
        for peer, record in self.scouts.items():
            if not record.dead and now - record.last_seen > self.dead_after_seconds:
                record.dead = True  # its assignment goes at the next placement, which heals the hole it left
                log.warning("Scout %s is dead: no heartbeat for %.1f s", peer, now - record.last_seen)

    def _candidate(self, record: ScoutRecord) -> Candidate:
        a = record.announcement
        per_block = max(1, self.offer.block_bytes * 2)  # room for the block and as much again for KV caches
        max_blocks = a.capabilities.memory_bytes // per_block if a.capabilities.memory_bytes else self.offer.n_layers
        serving = a.span if a.model == self.offer.model and a.state != "idle" else None
        return Candidate(a.peer_id, max(1, int(max_blocks)), a.capabilities.throughput or 1.0, serving,
                         a.peer_id in self.busy)

    def _place(self) -> None:
        live = [self._candidate(r) for r in self.scouts.values() if not r.dead and not r.refused and r.announcement.role == "span"]
        new = plan(self.offer.n_layers, live, self.assignments, self.span_limit)
        for peer, span in new.items():
            if self.assignments.get(peer) != span:
                log.warning("Scout %s assigned blocks [%d, %d)%s", peer, span[0], span[1],
                            f" (was [{self.assignments[peer][0]}, {self.assignments[peer][1]}))" if peer in self.assignments else "")
        self.assignments = new

    def announcement(self) -> OracleAnnouncement:
        self._seq += 1
        o = self.offer
        return prove(self.swarm_secret, OracleAnnouncement(peer_id=self.identity.peer_id, seq=self._seq, model=o.model, model_name=o.model_name,
                                  n_layers=o.n_layers, shards_url=o.shards_url, block_bytes=o.block_bytes, vocab_digest=o.vocab_digest,
                                  multiaddrs=self.node.addrs, assignments=self.assignments, data_port=self.data_port(),
                                  dial_in=sorted(self.dial_in)))

    async def _run(self) -> None:
        last_provide = -self.reprovide_seconds
        while True:
            try:
                self._expire()
                self._place()
                await self.node.publish(ORACLE_TOPIC, encode(self.announcement()))
                if self._joined or time.monotonic() - last_provide > self.reprovide_seconds:
                    # The DHT record is how a Scout that knows any swarm member finds this Oracle;
                    # stored again when peers join, so it lives on the peers closest to its key.
                    self._joined = False
                    await self.node.provide(ORACLE_DHT_KEY)
                    last_provide = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the control plane keeps going; the next heartbeat tries again
                log.warning("control plane heartbeat failed: %r", e)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self.heartbeat_seconds)
            except asyncio.TimeoutError:
                pass

    def serving(self) -> list[ServingScout]:
        """Scouts that serve the span assigned to them, and draft Scouts with this model's
        vocabulary: the ones to hold data-plane connections to. The address to dial is the one
        this Oracle's libp2p connection to the Scout runs to, never the one it announces."""
        out = []
        for r in self.scouts.values():
            a = r.announcement
            if r.dead or r.refused or a.state != "serving":
                continue
            if a.role == "draft":
                out.append(self._serving(a, None))
            elif a.peer_id in self.assignments and a.span == self.assignments[a.peer_id] and a.model == self.offer.model:
                out.append(self._serving(a, self.assignments[a.peer_id]))
        return out

    def _serving(self, a: ScoutAnnouncement, span: Span | None) -> ServingScout:
        if not a.listening:
            return ServingScout(a.peer_id, span, None, "it does not listen (--no-listen)")
        observed = self.node.observed_host(a.peer_id)
        if problem := dial_problem(observed, self.networks):
            return ServingScout(a.peer_id, span, None, problem)
        return ServingScout(a.peer_id, span, ScoutAddress(a.peer_id, observed, a.data_port))

    def status(self) -> dict[str, dict]:
        """Per peer id, what the registry knows (merged into /v1/cluster/status)."""
        now = time.monotonic()
        connected = self.node.connected_peers()
        out = {}
        for peer, r in self.scouts.items():
            a = r.announcement
            out[peer] = {
                "role": a.role, "refused": r.refused,
                "announced_state": "dead" if r.dead else a.state, "assigned_span": list(self.assignments[peer]) if peer in self.assignments else None,
                "announced_span": list(a.span) if a.span else None, "heartbeat_age_s": round(now - r.last_seen, 2),
                "throughput": a.capabilities.throughput, "memory_bytes": a.capabilities.memory_bytes,
                "device": a.capabilities.device, "load": a.load, "sessions_on_scout": a.sessions,
                "free_kv_bytes": a.free_kv_bytes, "p2p_connected": peer in connected,
            }
        return out
