"""The engine's Pipeline over the swarm: data-plane connections to the Scouts that serve blocks.

Scouts come from two sources: addresses given on the command line (``--scouts``, spans as the
Scouts were started with) and the libp2p control plane (Scouts that announced themselves and
serve the span the Oracle assigned them). A background task keeps one connection per serving
Scout, drops connections to Scouts the registry declared dead or moved to another span, and
pings idle ones (nothing else would notice an unused Scout dying).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

import torch
from redis.exceptions import RedisError

from shard_common.identity import Identity
from shard_common.model.span import SpanRequest

from oracle.store.reputation import ReputationStore

from .control import OracleControl
from .draft import ScoutDrafter
from .tickets import Auditor
from .remote import LocalFactory, LocalHop, RemotePipeline, ScoutAddress, ScoutConnection, ScoutError, ScoutUnreachable

log = logging.getLogger(__name__)


class Swarm:
    RETRY_SECONDS = 0.5
    PING_IDLE_SECONDS = 2.0
    PING_TIMEOUT_SECONDS = 5.0
    # A Scout that stopped answering is left alone this long before it is tried again (doubling
    # while it keeps timing out): each retry would cost a session's step a whole --hop-timeout.
    COOLDOWN_SECONDS = (10.0, 300.0)

    def __init__(self, identity: Identity, n_layers: int, addresses: list[ScoutAddress] | None = None,
                 control: OracleControl | None = None, wire_dtype: str = "float32", fill: LocalFactory | None = None,
                 vocab_size: int = 0, vocab_digest: str | None = None, draft_deadline_seconds: float = 2.0,
                 hop_timeout_seconds: float = 20.0):
        self.identity = identity
        self.hop_timeout_seconds = hop_timeout_seconds
        self.cooldown: dict[ScoutAddress, tuple[float, float]] = {}  # address -> (until, length)
        self.n_layers = n_layers
        self.vocab_size = vocab_size
        self.vocab_digest = vocab_digest
        self.draft_deadline_seconds = draft_deadline_seconds
        self.drafter: ScoutDrafter | None = None
        self.reputation: ReputationStore | None = None  # set before connect() to audit Scouts
        self.auditor: Auditor | None = None
        self.audit: Callable[[Callable[[], list[ScoutConnection]], Callable[[str, str], None]], Auditor] | None = None
        self.addresses = list(addresses or [])
        self.control = control
        self.wire_dtype = wire_dtype
        self.fill = fill  # --fallback-local: the Oracle computes spans no Scout serves
        self.connections: list[ScoutConnection] = []
        self.pipeline: RemotePipeline | None = None
        self.problem = "connecting to the Scouts"
        self._task: asyncio.Task | None = None

    async def connect(self) -> None:
        if self.reputation is not None:
            try:
                await self.reputation.load()
            except (RedisError, OSError) as e:
                log.warning("reputation not loaded (Redis: %s); Scouts start with a clean slate", e)
        if self.control is not None:
            self.control.refuse_peer = self._banned_reason
            await self.control.start()
        loop = asyncio.get_running_loop()
        if self.audit is not None:
            self.auditor = self.audit(self._auditable, self.apply_state)
            self.auditor.start()
        self.pipeline = RemotePipeline(self._live, self.n_layers, loop, self.wire_dtype, self.fill, auditor=self.auditor,
                                       reference=self.auditor.reference if self.auditor else None)
        self.drafter = ScoutDrafter(self.draft_scouts, loop, self.vocab_size, self.draft_deadline_seconds)
        self._task = loop.create_task(self._maintain())

    def _live(self) -> list[ScoutConnection]:
        """Scouts serving spans: the pipeline's hops."""
        return [c for c in self.connections if not c.dead and c.role == "span"]

    def _auditable(self) -> list[ScoutConnection]:
        """Span Scouts golden tickets go to, quarantined ones included."""
        return [c for c in self.connections if not c.dead and c.role == "span"]

    def _banned_reason(self, peer: str) -> str | None:
        if self.reputation is not None and self.reputation.state(peer) == "banned":
            return "banned for failing golden tickets (an operator can unban it: POST /v1/scouts/{peer_id}/unban)"
        return None

    def apply_state(self, peer: str, state: str) -> None:
        """Act on a Scout's reputation: quarantined Scouts get no traffic (their sessions move by
        the failover path), banned ones are disconnected and refused."""
        for c in self.connections:
            if c.address.peer_id != peer or c.dead:
                continue
            if state != "active" and not c.quarantined:
                log.warning("Scout %s is %s: its sessions move to other Scouts", peer, state)
            elif state == "active" and c.quarantined:
                log.warning("Scout %s is trusted again", peer)
            c.quarantined = state != "active"
            if state == "banned":
                c.dead = True
                asyncio.get_running_loop().create_task(c.close())

    def draft_scouts(self) -> list[ScoutConnection]:
        return [c for c in self.connections if not c.dead and c.role == "draft"]

    def _wanted(self) -> dict[ScoutAddress, tuple[int, int] | None]:
        """Scouts to hold a connection to, with the span they must serve (None: whatever they say)."""
        wanted: dict[ScoutAddress, tuple[int, int] | None] = {a: None for a in self.addresses}
        if self.control is not None:
            wanted.update(self.control.serving())
        return wanted

    async def _maintain(self) -> None:
        failures: dict[ScoutAddress, str] = {}
        while True:
            try:
                await self._maintain_once(failures)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep maintaining; a bug here must not freeze the swarm
                log.exception("swarm maintenance failed")
            await asyncio.sleep(self.RETRY_SECONDS)

    async def _maintain_once(self, failures: dict[ScoutAddress, str]) -> None:
        wanted = self._wanted()
        for c in [c for c in self.connections if not c.dead]:
            span = wanted.get(c.address, "gone")
            if span == "gone" or (span is not None and span != c.span):
                log.warning("dropping Scout %s: %s", c.address.peer_id, "it no longer serves" if span == "gone" else f"moved to {span}")
                c.dead = True
                await c.close()
        self._cool_down_unresponsive()
        live = {c.address for c in self.connections if not c.dead}
        now = time.monotonic()
        todo = [(a, span) for a, span in wanted.items() if a not in live and not self._banned_reason(a.peer_id)
                and self.cooldown.get(a, (0.0, 0.0))[0] <= now]
        # Concurrently: one Scout that accepts but never answers must not hold up the others.
        opened = await asyncio.gather(*(ScoutConnection(a, self.identity, self.hop_timeout_seconds).open() for a, _ in todo),
                                      return_exceptions=True)
        for (address, span), conn in zip(todo, opened):
            if isinstance(conn, BaseException):  # unreachable, wrong identity, bad handshake: try again later
                if isinstance(conn, asyncio.TimeoutError):  # it accepts but never completes a handshake
                    self._cool_down(address, "no handshake")
                    continue
                if failures.get(address) != str(conn):
                    log.warning("cannot use Scout %s: %s", address, conn or repr(conn))
                failures[address] = str(conn)
                continue
            failures.pop(address, None)
            if span is not None and conn.span != tuple(span):
                await conn.close()  # it is still switching spans; its next announcement will say
                continue
            if conn.role == "draft" and conn.welcome.vocab_digest != self.vocab_digest:
                log.warning("refusing draft Scout %s: its vocabulary differs from the model's", address.peer_id)
                await conn.close()
                continue
            if self.reputation is not None and self.reputation.state(address.peer_id) != "active":
                conn.quarantined = True  # quarantined in an earlier life: it earns trust back with tickets
            if self.auditor is not None and conn.role == "span":
                conn.probation = self.auditor.policy.probation
            self.connections = [c for c in self.connections if c.address != address] + [conn]
            what = "drafting" if conn.role == "draft" else "serving blocks [%d, %d)" % conn.span
            log.warning("connected to Scout %s %s", address.peer_id, what)
        load = self.pipeline.load()
        if self.control is not None:
            self.control.busy = {c.address.peer_id for c in load}
        now = time.monotonic()
        reserved = set(self.drafter.reserved.values()) if self.drafter else set()
        idle = [c for c in self.connections if not c.dead and c not in load and c not in reserved
                and now - c.last_used > self.PING_IDLE_SECONDS]
        for c, result in zip(idle, await asyncio.gather(*(c.ping(self.PING_TIMEOUT_SECONDS) for c in idle), return_exceptions=True)):
            if isinstance(result, ScoutError):
                log.warning("idle Scout %s is gone", c.address.peer_id)
        try:
            self.pipeline.path()
            self.problem = ""
        except ScoutUnreachable as e:
            self.problem = str(e)

    def _cool_down(self, address: ScoutAddress, what: str) -> None:
        shortest, longest = self.COOLDOWN_SECONDS
        length = min(longest, max(shortest, 2 * self.cooldown.get(address, (0.0, 0.0))[1]))
        self.cooldown[address] = (time.monotonic() + length, length)
        log.warning("Scout %s stopped answering (%s); not using it for %.0f s", address.peer_id, what, length)

    def _cool_down_unresponsive(self) -> None:
        now = time.monotonic()
        for c in self.connections:
            if c.dead and c.timed_out:
                c.timed_out = False
                self._cool_down(c.address, f"no reply within {c.timeout:.0f} s")
            elif not c.dead and c.forwards and c.address in self.cooldown and self.cooldown[c.address][0] <= now:
                del self.cooldown[c.address]  # answering again: a later timeout starts from the shortest pause

    @property
    def ready(self) -> bool:
        return self.pipeline is not None and not self.problem

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.auditor is not None:
            self.auditor.stop()
        for c in self.connections:
            await c.close()
        if self.control is not None:
            await self.control.stop()

    def status(self) -> dict:
        """Who serves which blocks, for /v1/cluster/status."""
        pipeline = self.pipeline
        load = pipeline.load() if pipeline else {}
        try:
            preferred = pipeline.path() if pipeline else []
        except ScoutUnreachable:
            preferred = []
        registry = self.control.status() if self.control else {}
        scouts, seen, now = [], set(), time.monotonic()
        for c in self.connections:
            if c.dead and c.address.peer_id in seen:
                continue
            seen.add(c.address.peer_id)
            info = registry.get(c.address.peer_id, {})
            state = ("refused" if c.dead and info.get("refused") else "dead" if c.dead else "quarantined" if c.quarantined else
                     "active" if c in load or c in preferred or c.role == "draft" else "spare")
            scouts.append({"peer_id": c.address.peer_id, "address": f"{c.address.host}:{c.address.port}", "role": c.role,
                           "span": list(c.span), "state": state, "sessions": load.get(c, 0), "requests": c.requests,
                           "last_ms": round(c.last_ms, 3), "latency_ms": round(c.ewma_ms, 3) if c.ewma_ms else None,
                           "forwards": c.forwards,
                           "overhead_ms": round((c.forward_ms - c.compute_ms) / c.forwards, 3) if c.forwards else None,
                           "tokens_forwarded": c.tokens, "wire_bytes": c.wire_bytes,
                           "reputation": self.reputation.state(c.address.peer_id) if self.reputation else None,
                           "cooldown_s": round(self.cooldown[c.address][0] - now, 1)
                           if c.address in self.cooldown and self.cooldown[c.address][0] > now else None,
                           **info})
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
            "chain": [c.address.peer_id for c in preferred],
            "local_spans": sorted({h.span for h in [*preferred, *load] if isinstance(h, LocalHop)}),
            "scouts": scouts,
            "failovers": pipeline.failovers if pipeline else 0,
            "tickets": self.auditor.status() if self.auditor else None,
            "sessions": len(pipeline.routes) if pipeline else 0,
        }

    def _ready(self) -> RemotePipeline:
        if self.pipeline is None:
            raise ScoutUnreachable(f"no route through the swarm yet: {self.problem}")
        return self.pipeline

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        return self._ready().forward(hidden, requests)

    def rollback(self, session: str, length: int) -> None:
        self._ready().rollback(session, length)

    def fork(self, source: str, target: str) -> None:
        self._ready().fork(source, target)

    def free(self, session: str) -> None:
        self._ready().free(session)



