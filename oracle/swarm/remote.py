"""The Oracle's side of the data plane: connections to Scouts, and a Pipeline that runs the
blocks hop by hop through a chain of them."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from oracle.engine.pipeline import LocalPipeline
from shard_common.dataplane import connect
from shard_common.identity import Identity
from shard_common.model.span import Span, SpanRequest
from shard_common.protocol import Close, Draft, Drafted, Error, Fork, Forward, Kind, Ping, Rollback, SessionSlice, Welcome
from shard_common.wire import read_frame, tensor_from_bytes, tensor_to_bytes, through_wire, write_frame

from .routing import NoRoute, shortest_path

log = logging.getLogger(__name__)


class ScoutError(RuntimeError):
    """A Scout answered a request with an error, or could not be reached."""


class ScoutUnreachable(ScoutError):
    """The connection failed or timed out: the Scout is gone, route around it."""

    api_code = "no_route"


@dataclass(frozen=True)
class ScoutAddress:
    peer_id: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "ScoutAddress":
        """``PEER_ID@HOST:PORT``"""
        try:
            peer, hostport = text.split("@", 1)
            host, port = hostport.rsplit(":", 1)
            return cls(peer, host.strip("[]"), int(port))
        except ValueError:
            raise ValueError(f"a Scout address looks like PEER_ID@HOST:PORT, not {text!r}") from None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.peer_id}@{host}:{self.port}"


class ScoutConnection:
    """One authenticated connection; requests are sent one at a time (the engine steps serially).
    A request unanswered after ``timeout`` seconds (``serve --hop-timeout``) kills the connection."""

    HANDSHAKE_SECONDS = 10.0

    def __init__(self, address: ScoutAddress, identity: Identity, timeout: float = 30.0):
        self.address = address
        self.identity = identity
        self.timeout = timeout
        self.welcome: Welcome | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.dead = False
        self.timed_out = False  # it stopped answering (rather than closing): the Swarm backs off from it
        self.requests = 0
        self.last_ms = 0.0
        # Forward statistics: round trips vs the Scout's own compute time give the per-hop overhead.
        self.forwards = 0
        self.forward_ms = 0.0
        self.compute_ms = 0.0
        self.tokens = 0
        self.wire_bytes = 0
        self.ewma_ms: float | None = None  # forward round trip, smoothed: the routing weight
        self.last_used = 0.0
        self.quarantined = False  # failed golden tickets: no traffic, only more tickets
        self.last_reply: dict | None = None  # the last forward reply's signed digest (evidence for tickets)
        self.probation = 0  # forwards still to be mirrored (checked by the Oracle before use)

    @property
    def span(self) -> tuple[int, int]:
        return self.welcome.span

    async def open(self) -> "ScoutConnection":
        a = self.address
        handshake = min(self.timeout, self.HANDSHAKE_SECONDS)
        self._reader, self._writer, _ = await connect(a.host, a.port, self.identity, a.peer_id, handshake)
        kind, welcome, _ = await asyncio.wait_for(read_frame(self._reader), handshake)
        if kind != Kind.WELCOME:
            raise ScoutError(f"{a.peer_id} answered the handshake with {kind.name}")
        self.welcome = welcome
        return self

    async def close(self) -> None:
        # Closing an SSL stream twice leaves it unable even to refuse a write: close once.
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()

    @property
    def role(self) -> str:
        return self.welcome.role

    async def _request(self, kind: Kind, message, body: bytes = b"", timeout: float | None = None):
        if self.dead:
            raise ScoutUnreachable(f"Scout {self.address.peer_id} is gone")
        async with self._lock:
            if self.dead or self._writer.is_closing():  # closed while this request waited for the lock
                self.dead = True
                raise ScoutUnreachable(f"Scout {self.address.peer_id} is gone")
            message.id = next(self._ids)
            started = time.perf_counter()
            try:
                await write_frame(self._writer, kind, message, body)
                reply_kind, reply, reply_body = await asyncio.wait_for(read_frame(self._reader), timeout or self.timeout)
                self.requests += 1
                self.last_ms = (time.perf_counter() - started) * 1000
                self.last_used = time.monotonic()
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                self.dead = True
                self.timed_out = isinstance(e, asyncio.TimeoutError)
                await self.close()
                raise ScoutUnreachable(f"Scout {self.address.peer_id} failed: {e!r}") from e
        if reply.id != message.id:
            raise ScoutError(f"Scout {self.address.peer_id} answered request {reply.id}, expected {message.id}")
        if reply_kind == Kind.ERROR:
            assert isinstance(reply, Error)
            raise ScoutError(f"Scout {self.address.peer_id}: {reply.code}: {reply.message}")
        return reply, reply_body

    async def forward(self, hidden: torch.Tensor, requests: list[SpanRequest], dtype: str) -> torch.Tensor:
        message = Forward(sessions=[SessionSlice(session=r.session, start=r.start, n_tokens=r.n_tokens) for r in requests],
                          dtype=dtype, shape=tuple(hidden.shape))
        payload = tensor_to_bytes(hidden, dtype)
        reply, body = await self._request(Kind.FORWARD, message, payload)
        self.forwards += 1
        self.forward_ms += self.last_ms
        self.ewma_ms = self.last_ms if self.ewma_ms is None else 0.8 * self.ewma_ms + 0.2 * self.last_ms
        self.compute_ms += reply.compute_ms
        self.tokens += hidden.shape[0]
        self.wire_bytes += len(payload) + len(body)
        self.last_reply = {"request_id": reply.id, "output_sha256": hashlib.sha256(body).hexdigest(), "signature": reply.signature}
        return tensor_from_bytes(body, reply.dtype, reply.shape)

    async def rollback(self, session: str, length: int) -> None:
        await self._request(Kind.ROLLBACK, Rollback(session=session, length=length))

    async def fork(self, source: str, target: str) -> None:
        await self._request(Kind.FORK, Fork(source=source, target=target))

    async def free(self, session: str) -> None:
        await self._request(Kind.CLOSE, Close(session=session))

    async def ping(self, timeout: float | None = None) -> None:
        await self._request(Kind.PING, Ping(), timeout=timeout)

    async def draft(self, request: Draft, timeout: float) -> Drafted:
        """k proposals from a draft Scout; past ``timeout`` the connection is given up (a frame
        stream cannot be resynchronised) and the Swarm reconnects in the background."""
        reply, _ = await self._request(Kind.DRAFT, request, timeout=timeout)
        return reply


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return float((output.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12))


def trim_chunks(chunks: list[int], length: int) -> list[int]:
    """The feeding pattern of a session's first ``length`` positions."""
    out, total = [], 0
    for n in chunks:
        if total >= length:
            break
        out.append(min(n, length - total))
        total += out[-1]
    return out


class LocalHop(LocalPipeline):
    """Blocks the Oracle computes itself in place of a Scout (``--fallback-local``): the local
    pipeline, shaped like a ScoutConnection, but synchronous (it runs on the engine's thread)."""

    dead = False
    quarantined = False
    probation = 0

    def __init__(self, span: Span):
        super().__init__(span)
        self.address = ScoutAddress("oracle-local", "-", 0)

    @property
    def span(self) -> tuple[int, int]:
        return self.local.start, self.local.end

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest], dtype: str = "float32") -> torch.Tensor:
        return super().forward(hidden, requests)


LocalFactory = Callable[[int, int], LocalHop]

# A hop nobody has measured yet is assumed this slow; the Oracle's own blocks are a last resort.
UNMEASURED_MS = 5.0
LOCAL_HOP_COST = 1e6


class RemotePipeline:
    """The engine's Pipeline over the swarm. Called on the engine's thread; the network work runs
    on the event loop (``loop``) that owns the connections.

    Routing: a session gets its chain of hops when it starts, the shortest path over the live hops
    (``hops()``) by measured round-trip time and the sessions each hop already carries, so sessions
    spread over replicas. A batched step groups its sessions by chain.

    Failover: the pipeline keeps each session's inputs to the first hop (its embedded tokens)
    and how they were fed (prompt chunks, then one token per step). When a hop becomes
    unreachable, every session routed through it gets a replacement path for that hop's blocks
    (a replica, a Scout that took the span over, or the Oracle's own blocks with ``fill``), and its
    caches there are rebuilt from that history before its next step, in the same chunks, so the
    rebuilt cache is bit-identical to the lost one (a single prefill of the whole history would
    differ in the last bits, enough to flip near-tied tokens later). If no replacement exists yet,
    the step waits up to ``reroute_seconds`` for one (a rebalance in progress) before giving up.
    The client sees a pause, not an error.
    """

    def __init__(self, hops: Callable[[], list], n_layers: int, loop: asyncio.AbstractEventLoop,
                 wire_dtype: str = "float32", fill: LocalFactory | None = None, reroute_seconds: float = 20.0,
                 auditor=None, reference=None):
        self.hops = hops
        self.auditor = auditor  # told of every forward a Scout served (golden tickets follow some)
        self.reference = reference  # the Oracle's own blocks, mirroring Scouts on probation
        self.n_layers = n_layers
        self.fill = fill
        self.loop = loop
        self.wire_dtype = wire_dtype
        self.reroute_seconds = reroute_seconds
        self.routes: dict[str, list] = {}
        self.history: dict[str, torch.Tensor] = {}
        self.chunks: dict[str, list[int]] = {}
        self.stale: set[tuple[str, object]] = set()  # (session, hop) whose cache there must be rebuilt
        self.local_hops: dict[tuple[int, int], LocalHop] = {}
        self.failovers = 0

    def _call(self, hop, method: str, *args):
        """A Scout's request runs on the event loop that owns its connection; a LocalHop right here."""
        if isinstance(hop, LocalHop):
            return getattr(hop, method)(*args)
        return asyncio.run_coroutine_threadsafe(getattr(hop, method)(*args), self.loop).result()

    # ---- routing ------------------------------------------------------------------------------

    def load(self) -> dict[object, int]:
        counts: dict[object, int] = {}
        for route in self.routes.values():
            for hop in route:
                counts[hop] = counts.get(hop, 0) + 1
        return counts

    def _candidates(self, start: int, end: int) -> list:
        live = [h for h in self.hops() if not h.dead and not h.quarantined]
        if self.fill is not None:
            live += self._local_hops(live, start, end)
        return live

    def _local_hops(self, live: list, start: int, end: int) -> list:
        """The Oracle's own blocks for every stretch of [start, end) no live Scout serves."""
        covered = [False] * self.n_layers
        for h in live:
            for b in range(h.span[0], h.span[1]):
                covered[b] = True
        out, b = [], start
        while b < end:
            if covered[b]:
                b += 1
                continue
            e = b
            while e < end and not covered[e]:
                e += 1
            if (b, e) not in self.local_hops:
                self.local_hops[(b, e)] = self.fill(b, e)
            out.append(self.local_hops[(b, e)])
            b = e
        return out

    def path(self, start: int = 0, end: int | None = None) -> list:
        """The cheapest live hops covering blocks [start, end) now."""
        end = self.n_layers if end is None else end
        load = self.load()

        def cost(hop) -> float:
            if isinstance(hop, LocalHop):
                return LOCAL_HOP_COST
            return (hop.ewma_ms or UNMEASURED_MS) * (1 + load.get(hop, 0) / 8)

        try:
            return shortest_path(self._candidates(start, end), start, end, cost, lambda h: h.span)
        except NoRoute as e:
            raise ScoutUnreachable(f"no route through the swarm: {e}") from None

    def _wait_for_path(self, start: int, end: int, why: str) -> list:
        """A path over blocks [start, end), waiting up to ``reroute_seconds`` for one to appear
        (a replica finishing its load, a restarted Scout coming back)."""
        deadline = time.monotonic() + self.reroute_seconds
        while True:
            try:
                return self.path(start, end)
            except ScoutUnreachable as e:
                if time.monotonic() > deadline:
                    raise ScoutUnreachable(f"{e} ({why}; waited {self.reroute_seconds:.0f} s)") from None
                time.sleep(0.25)

    def _route_of(self, r: SpanRequest) -> list:
        route = self.routes.get(r.session)
        if route is None:
            route = self.routes[r.session] = self._wait_for_path(0, self.n_layers, "a new session")
            if r.start > 0:  # a session we lost track of: rebuild it everywhere from its history
                self.stale.update((r.session, hop) for hop in route)
        return route

    def _reroute(self, dead) -> None:
        """Give every session routed through ``dead`` a replacement for its blocks."""
        replacement = self._wait_for_path(*dead.span, f"no Scout left after {dead.address.peer_id} failed")
        moved = 0
        for session, route in self.routes.items():
            if dead in route:
                i = route.index(dead)
                route[i:i + 1] = replacement
                self.stale.update((session, hop) for hop in replacement)
                moved += 1
        self.stale = {(s, h) for s, h in self.stale if h is not dead}
        self.failovers += 1
        log.warning("blocks [%d, %d) moved from %s to %s; %d sessions will be replayed", dead.span[0], dead.span[1],
                    dead.address.peer_id, " → ".join(h.address.peer_id for h in replacement), moved)

    # ---- the Pipeline protocol ----------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(self._route_of(r)), []).append(i)
        offsets = list(itertools.accumulate((r.n_tokens for r in requests), initial=0))
        # A prompt read in this step: material for golden tickets (real hidden states).
        prompt = next((hidden[offsets[i]:offsets[i + 1]] for i, r in enumerate(requests) if r.start == 0 and r.n_tokens > 1), None)
        if len(groups) == 1:
            out = self._run_group(hidden, requests, prompt).float()
        else:
            out = torch.empty(hidden.shape, dtype=torch.float32)
        for indices in groups.values() if len(groups) > 1 else []:
            rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
            out[rows] = self._run_group(hidden[rows], [requests[i] for i in indices], prompt).float()
        for r, offset in zip(requests, offsets):
            rows = hidden[offset:offset + r.n_tokens].float()
            before = self.history.get(r.session)
            self.history[r.session] = rows if before is None else torch.cat([before[: r.start], rows])
            self.chunks[r.session] = trim_chunks(self.chunks.get(r.session, []), r.start) + [r.n_tokens]
        return out

    def _run_group(self, x: torch.Tensor, requests: list[SpanRequest], prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Sessions sharing one route, hop by hop; a failed (or quarantined) hop is replaced and
        the step goes on."""
        i = 0
        while i < len(self.routes[requests[0].session]):
            hop = self.routes[requests[0].session][i]
            try:
                if hop.quarantined:
                    raise ScoutUnreachable(f"Scout {hop.address.peer_id} is quarantined")
                for r in requests:
                    if (r.session, hop) in self.stale:
                        self._replay(r, i)
                out = self._call(hop, "forward", x, requests, self.wire_dtype)
                if hop.probation > 0 and self.reference is not None:
                    self._mirror(hop, x, out, requests)
                if self.auditor is not None and not isinstance(hop, LocalHop):
                    self.auditor.observe(hop, prompt)
                x = out
                i += 1
            except ScoutUnreachable as e:
                log.warning("hop %d: %s", i, e)
                self._reroute(hop)
        return x

    def _mirror(self, hop: ScoutConnection, x: torch.Tensor, out: torch.Tensor, requests: list[SpanRequest]) -> None:
        """Check a forward of a Scout on probation against the Oracle's own blocks before its
        output is used: a Scout that lies from the start never reaches a client. Only sessions the
        mirror has followed from their first position can be checked."""
        mirror = self.reference.hop(*hop.span)
        offsets = list(itertools.accumulate((r.n_tokens for r in requests), initial=0))
        picked = [i for i, r in enumerate(requests) if mirror.local.kv.length(r.session) == r.start]
        if not picked:
            return
        rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in picked])
        # Judge it on what it received and what it could send: the wire's rounding both ways.
        expected = through_wire(mirror.forward(through_wire(x[rows], self.wire_dtype), [requests[i] for i in picked]),
                                self.wire_dtype)
        hop.probation -= 1
        if not self.auditor.mirrored(hop, relative_error(out[rows], expected)):
            hop.quarantined = True
            raise ScoutUnreachable(f"Scout {hop.address.peer_id} failed its probation check")

    def _replay(self, r: SpanRequest, i: int) -> None:
        """Rebuild ``r.session``'s cache on hop ``i`` of its route, in its original chunks."""
        route = self.routes[r.session]
        history = self.history.get(r.session)
        position = 0
        scratch = f"{r.session}~replay"
        for n in trim_chunks(self.chunks.get(r.session, []), r.start):
            x = history[position:position + n]
            for hop in route[:i]:
                x = self._call(hop, "forward", x, [SpanRequest(scratch, position, n)], self.wire_dtype)
            self._call(route[i], "forward", x, [SpanRequest(r.session, position, n)], self.wire_dtype)
            position += n
        for hop in route[:i]:
            self._call(hop, "free", scratch)
        self.stale.discard((r.session, route[i]))

    def _each_hop(self, session: str, method: str, *args, also: str | None = None) -> None:
        """Send one cache operation for ``session`` to every hop of its route, except hops where
        its cache is due to be rebuilt anyway (there ``also`` is marked for rebuilding too)."""
        for hop in list(self.routes.get(session, [])):
            if (session, hop) in self.stale:
                if also is not None:
                    self.stale.add((also, hop))
                continue
            try:
                self._call(hop, method, *args)
            except ScoutUnreachable as e:
                log.warning("%s: %s", method, e)
                if method != "free":
                    self._reroute(hop)
                    if also is not None:
                        self.stale.update((also, h) for h in self.routes[session] if (session, h) in self.stale)

    def _forget_mirrors(self, session: str, length: int = 0) -> None:
        for hop in self.reference.hops() if self.reference is not None else []:
            if length == 0:
                hop.local.free(session)
            elif hop.local.kv.length(session) > length:
                hop.local.rollback(session, length)

    def rollback(self, session: str, length: int) -> None:
        self._forget_mirrors(session, length)
        if session in self.history:
            self.history[session] = self.history[session][:length]
            self.chunks[session] = trim_chunks(self.chunks[session], length)
        self._each_hop(session, "rollback", session, length)

    def fork(self, source: str, target: str) -> None:
        if source in self.history:
            self.history[target] = self.history[source]
            self.chunks[target] = list(self.chunks[source])
        if source in self.routes:
            self.routes[target] = list(self.routes[source])
        self._each_hop(source, "fork", source, target, also=target)

    def free(self, session: str) -> None:
        self._forget_mirrors(session)
        self.history.pop(session, None)
        self.chunks.pop(session, None)
        self._each_hop(session, "free", session)
        self.routes.pop(session, None)
        self.stale = {(s, h) for s, h in self.stale if s != session}
