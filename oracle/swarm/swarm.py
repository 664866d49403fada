"""The swarm as the Oracle holds it: data-plane connections to the Scouts that serve blocks, the
runner that steps the engine's sessions over them, and the draft Scouts' drafter.

Scouts come from two sources: addresses given on the command line (``--scouts``, spans as the
Scouts were started with) and the libp2p control plane (Scouts that announced themselves and
serve the span the Oracle assigned them). A background task keeps one connection per serving
Scout, drops connections to Scouts the registry declared dead or moved to another span, and
pings idle ones (nothing else would notice an unused Scout dying). Whether a Scout may be used at
all is ``PeerHealth``'s answer (oracle/trust), never a flag kept here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

from oracle.trust.health import PeerHealth
from oracle.trust.traffic import TrafficAudit
from oracle.trust.tickets import Auditor
from shard_common.identity import Identity

from .connection import ScoutAddress, ScoutConnection, ScoutError, ScoutUnreachable
from .control import OracleControl
from .dial_in import DialInListener
from .draft import ScoutDrafter
from .local_hop import LocalFactory, LocalHop
from .runner import SwarmPipeline

log = logging.getLogger(__name__)


class Swarm:
    RETRY_SECONDS = 0.5
    PING_IDLE_SECONDS = 2.0
    PING_TIMEOUT_SECONDS = 5.0

    def __init__(self, identity: Identity, n_layers: int, loop: asyncio.AbstractEventLoop, health: PeerHealth,
                 addresses: list[ScoutAddress] | None = None, control: OracleControl | None = None, wire_dtype: str = "float32",
                 fill: LocalFactory | None = None, vocab_size: int = 0, vocab_digest: str | None = None,
                 draft_deadline_seconds: float = 2.0, hop_timeout_seconds: float = 20.0, auditor: Auditor | None = None,
                 traffic: TrafficAudit | None = None, piggyback: bool = True, reroute_seconds: float = 20.0,
                 listener: DialInListener | None = None, pipeline_depth: int = 0, chain: bool = True):
        self.identity = identity
        self.n_layers = n_layers
        self.health = health
        self.hop_timeout_seconds = hop_timeout_seconds
        self.vocab_digest = vocab_digest
        self.auditor = auditor
        self.traffic = traffic
        self.taint = traffic.taint if traffic is not None else None  # what failed Scouts may have spoiled
        self.addresses = list(addresses or [])
        self.control = control
        self.wire_dtype = wire_dtype
        self.connections: list[ScoutConnection] = []
        self.listener = listener  # Scouts the Oracle cannot reach dial in here
        # peer id → (the address, how dialling it failed): not dialled again while it announces the
        # same address (a restarted Scout announces a new port and is tried again).
        self.dial_failed: dict[str, tuple[ScoutAddress, str]] = {}
        self.dial_in: dict[str, str] = {}  # peer id → why it must open the connection itself
        # The engine's Pipeline and drafter: built now, usable once connect() has run on ``loop``.
        self.pipeline = SwarmPipeline(self._live, n_layers, loop, health, wire_dtype, fill, reroute_seconds,
                                      auditor=auditor, traffic=traffic, piggyback=piggyback, depth=pipeline_depth,
                                      chain=chain)
        self.drafter = ScoutDrafter(self.draft_scouts, loop, vocab_size, draft_deadline_seconds)
        self.problem = "connecting to the Scouts"
        self._task: asyncio.Task | None = None

    async def connect(self) -> None:
        await self.health.start()
        if self.listener is not None:
            await self.listener.start(self._adopt_dialed)
        if self.control is not None:
            await self.control.start()
        if self.auditor is not None:
            self.auditor.start(self._live)
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    def _live(self) -> list[ScoutConnection]:
        """Connected span Scouts, quarantined ones included: the runner's hops (it asks
        PeerHealth which may carry traffic) and the auditor's subjects (quarantined ones keep
        getting tickets)."""
        return [c for c in self.connections if not c.dead and c.role == "span"]

    def draft_scouts(self) -> list[ScoutConnection]:
        return [c for c in self.connections if not c.dead and c.role == "draft"]

    def _wanted(self) -> dict[str, tuple[ScoutAddress | None, tuple[int, int] | None, str | None]]:
        """Per peer id: where to dial it (None: it dials in, for the reason given last), and the
        span it must serve (None: whatever it says). Addresses given with --scouts are the
        operator's, dialled as given."""
        wanted: dict[str, tuple[ScoutAddress | None, tuple[int, int] | None, str | None]] = {
            a.peer_id: (a, None, None) for a in self.addresses}
        for s in self.control.serving() if self.control is not None else []:
            wanted[s.peer_id] = (s.address, s.span, s.unreachable)
        return wanted

    def _update_dial_in(self, wanted: dict) -> None:
        """Which Scouts must dial in: those the Oracle may not or could not dial, unless a direct
        connection already runs (a libp2p reconnect must not flip them), and those that did dial
        in (they keep their connection only while listed)."""
        direct = {c.peer_id for c in self.connections if not c.dead and c.reached == "direct"}
        dial_in = {}
        for peer, (address, _, unreachable) in wanted.items():
            failed = self.dial_failed.get(peer)
            why = failed[1] if failed and failed[0] == address else unreachable if address is None else None
            if why and peer not in direct:
                dial_in[peer] = why
                if peer not in self.dial_in:
                    log.warning("Scout %s will dial in: %s", peer, why)
        self.dial_failed = {peer: f for peer, f in self.dial_failed.items() if peer in wanted and f[0] == wanted[peer][0]}
        self.dial_in = dial_in
        if self.control is not None:
            self.control.dial_in = set(dial_in)

    async def _maintain(self) -> None:
        failures: dict[str, str] = {}
        while True:
            try:
                await self._maintain_once(failures)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep maintaining; a bug here must not freeze the swarm
                log.exception("swarm maintenance failed")
            await asyncio.sleep(self.RETRY_SECONDS)

    async def _maintain_once(self, failures: dict[str, str]) -> None:
        wanted = self._wanted()
        for c in [c for c in self.connections if not c.dead]:
            span = wanted[c.peer_id][1] if c.peer_id in wanted else "gone"
            why = ("it no longer serves" if span == "gone" else f"it moved to {span}" if span is not None and span != c.span
                   else self.health.refusal(c.peer_id))
            if why:
                log.warning("dropping Scout %s: %s", c.peer_id, why)
                c.dead = True
                await c.close()
        live = {c.peer_id for c in self.connections if not c.dead}
        todo = [(address, span) for peer, (address, span, _) in wanted.items() if peer not in live and address is not None
                and self.dial_failed.get(peer, (None,))[0] != address and self.health.may_connect(peer)]
        # Concurrently: one Scout that accepts but never answers must not hold up the others.
        opened = await asyncio.gather(*(ScoutConnection(a, self.identity, self.hop_timeout_seconds, self.health).open()
                                        for a, _ in todo), return_exceptions=True)
        for (address, span), conn in zip(todo, opened):
            peer = address.peer_id
            if isinstance(conn, (ConnectionRefusedError, asyncio.TimeoutError)) or \
                    (isinstance(conn, OSError) and conn.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH)):
                if self.listener is not None and self.control is not None and peer not in {a.peer_id for a in self.addresses}:
                    # The dial-back failed: the Scout is behind NAT or a firewall. It dials in.
                    self.dial_failed[peer] = (address, f"dialling {address.host}:{address.port} failed ({conn!r})")
                    log.warning("Scout %s cannot be reached at %s:%d", peer, address.host, address.port)
                    continue
            if isinstance(conn, BaseException):  # unreachable, wrong identity, bad handshake: try again later
                if not isinstance(conn, asyncio.TimeoutError) and failures.get(peer) != str(conn):
                    log.warning("cannot use Scout %s: %s", address, conn or repr(conn))
                failures[peer] = str(conn)
                continue
            failures.pop(peer, None)
            self._adopt(conn, span)
        self._update_dial_in(wanted)
        load = self.pipeline.load()
        if self.control is not None:
            self.control.busy = {c.peer_id for c in load}
        now = time.monotonic()
        reserved = set(self.drafter.reserved.values())
        idle = [c for c in self.connections if not c.dead and c not in load and c not in reserved
                and now - c.last_used > self.PING_IDLE_SECONDS]
        for c, result in zip(idle, await asyncio.gather(*(c.ping(self.PING_TIMEOUT_SECONDS) for c in idle), return_exceptions=True)):
            if isinstance(result, ScoutError):
                log.warning("idle Scout %s is gone", c.peer_id)
        try:
            self.pipeline.path()
            self.problem = ""
        except ScoutUnreachable as e:
            self.problem = str(e)

    async def _adopt_dialed(self, conn: ScoutConnection) -> bool:
        """A Scout dialled in (it is behind NAT): keep the connection if it is one the swarm wants
        and holds no connection to yet."""
        wanted = self._wanted().get(conn.peer_id)
        if wanted is None or not self.health.may_connect(conn.peer_id):
            log.warning("refused a data-plane connection from Scout %s: %s", conn.peer_id,
                        "it serves nothing assigned" if wanted is None else "it may not connect now")
            return False
        if any(c.peer_id == conn.peer_id and not c.dead for c in self.connections):
            return False
        return self._adopt(conn, wanted[1])

    def _adopt(self, conn: ScoutConnection, span: tuple[int, int] | None) -> bool:
        """Keep ``conn`` as the connection to its Scout, unless it serves the wrong thing."""
        address = conn.address
        if span is not None and conn.span != tuple(span):
            conn.dead = True  # it is still switching spans; its next announcement will say
        elif conn.role == "draft" and conn.welcome.vocab_digest != self.vocab_digest:
            log.warning("refusing draft Scout %s: its vocabulary differs from the model's", address.peer_id)
            conn.dead = True
        if conn.dead:
            asyncio.get_running_loop().create_task(conn.close())
            return False
        self.connections = [c for c in self.connections if c.peer_id != conn.peer_id] + [conn]
        what = "drafting" if conn.role == "draft" else "serving blocks [%d, %d)" % conn.span
        log.warning("connected to Scout %s %s (%s)", address.peer_id, what, conn.reached)
        return True

    @property
    def ready(self) -> bool:
        return self.pipeline is not None and not self.problem

    async def close(self) -> None:
        self.pipeline.abort()
        if self._task is not None:
            self._task.cancel()
        if self.auditor is not None:
            self.auditor.stop()
        for c in self.connections:
            await c.close()
        if self.control is not None:
            await self.control.stop()
        if self.listener is not None:
            await self.listener.close()
        await self.health.drain()

    def status(self) -> dict:
        """Who serves which blocks, for /v1/cluster/status."""
        pipeline = self.pipeline
        load = pipeline.load()
        try:
            preferred = pipeline.path()
        except ScoutUnreachable:
            preferred = []
        registry = self.control.status() if self.control else {}
        scouts, seen = [], set()
        tainted = self.taint.status() if self.taint is not None else {}
        for c in self.connections:
            if c.dead and c.peer_id in seen:
                continue
            seen.add(c.peer_id)
            info = registry.get(c.peer_id, {})
            health = self.health.status(c.peer_id)
            state = ("refused" if c.dead and info.get("refused") else "dead" if c.dead else
                     "quarantined" if health["reputation"] != "active" else
                     "active" if c in load or c in preferred or c.role == "draft" else "spare")
            scouts.append({"peer_id": c.peer_id, "address": f"{c.address.host}:{c.address.port}" if c.address.port else c.address.host, "reached": c.reached,
                           "role": c.role, "span": list(c.span), "state": state, "sessions": load.get(c, 0),
                           "requests": c.requests, "round_trips": dict(c.round_trips),
                           "last_ms": round(c.last_ms, 3), "latency_ms": round(c.ewma_ms, 3) if c.ewma_ms else None,
                           "forwards": c.forwards, "chained_forwards": c.chained,
                           "overhead_ms": round((c.forward_ms - c.compute_ms) / c.forwards, 3) if c.forwards else None,
                           "tokens_forwarded": c.tokens, "wire_bytes": c.wire_bytes, **health, **info,
                           "tainted_sessions": tainted.get(c.peer_id, {}).get("sessions")})
        for peer, info in registry.items():
            if peer not in seen:  # announced but not (yet) serving: idle, loading, or dead
                state = "dead" if info["announced_state"] == "dead" else "refused" if info["refused"] else "joining"
                span = info["announced_span"] or info["assigned_span"]
                scouts.append({"peer_id": peer, "address": None, "span": span, "state": state, "sessions": 0,
                               "requests": 0, **info})
        coverage = [0] * self.n_layers  # live span Scouts serving each block
        for s in scouts:
            if s["state"] in ("active", "spare") and s.get("role", "span") == "span" and s["span"]:
                for b in range(*s["span"]):
                    coverage[b] += 1
        return {
            "coverage": coverage,
            "oracle_peer_id": self.identity.peer_id,
            "oracle_multiaddrs": self.control.node.addrs if self.control else [],
            "wire_dtype": self.wire_dtype,
            "chain": [c.peer_id for c in preferred],
            "local_spans": sorted({h.span for h in [*preferred, *load] if isinstance(h, LocalHop)}),
            "scouts": scouts,
            "failovers": pipeline.failovers,
            "data_plane": pipeline.status(),
            "tickets": self.auditor.status() if self.auditor else self.traffic.verdicts.status() if self.traffic else None,
            "audits": self.traffic.status() if self.traffic else None,
            "sessions": len(pipeline.routes),
        }
