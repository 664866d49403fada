"""The Oracle's side of the data plane: connections to Scouts, and a Pipeline that runs the
blocks hop by hop through a chain of them."""

from __future__ import annotations

import asyncio
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
from shard_common.protocol import Close, Error, Fork, Forward, Kind, Ping, Rollback, SessionSlice, Welcome
from shard_common.wire import read_frame, tensor_from_bytes, tensor_to_bytes, write_frame

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
    """One authenticated connection; requests are sent one at a time (the engine steps serially)."""

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
        self.requests = 0
        self.last_ms = 0.0
        # Forward statistics: round trips vs the Scout's own compute time give the per-hop overhead.
        self.forwards = 0
        self.forward_ms = 0.0
        self.compute_ms = 0.0
        self.tokens = 0
        self.wire_bytes = 0

    @property
    def span(self) -> tuple[int, int]:
        return self.welcome.span

    async def open(self) -> "ScoutConnection":
        a = self.address
        self._reader, self._writer, _ = await connect(a.host, a.port, self.identity, a.peer_id, self.timeout)
        kind, welcome, _ = await asyncio.wait_for(read_frame(self._reader), self.timeout)
        if kind != Kind.WELCOME:
            raise ScoutError(f"{a.peer_id} answered the handshake with {kind.name}")
        self.welcome = welcome
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    async def _request(self, kind: Kind, message, body: bytes = b""):
        if self.dead:
            raise ScoutUnreachable(f"Scout {self.address.peer_id} is gone")
        async with self._lock:
            message.id = next(self._ids)
            started = time.perf_counter()
            try:
                await write_frame(self._writer, kind, message, body)
                reply_kind, reply, reply_body = await asyncio.wait_for(read_frame(self._reader), self.timeout)
                self.requests += 1
                self.last_ms = (time.perf_counter() - started) * 1000
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                self.dead = True
                self._writer.close()
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
        self.compute_ms += reply.compute_ms
        self.tokens += hidden.shape[0]
        self.wire_bytes += len(payload) + len(body)
        return tensor_from_bytes(body, reply.dtype, reply.shape)

    async def rollback(self, session: str, length: int) -> None:
        await self._request(Kind.ROLLBACK, Rollback(session=session, length=length))

    async def fork(self, source: str, target: str) -> None:
        await self._request(Kind.FORK, Fork(source=source, target=target))

    async def free(self, session: str) -> None:
        await self._request(Kind.CLOSE, Close(session=session))

    async def ping(self) -> None:
        await self._request(Kind.PING, Ping())


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

    def __init__(self, span: Span):
        super().__init__(span)
        self.address = ScoutAddress("oracle-local", "-", 0)

    @property
    def span(self) -> tuple[int, int]:
        return self.local.start, self.local.end

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest], dtype: str = "float32") -> torch.Tensor:
        return super().forward(hidden, requests)


LocalFactory = Callable[[int, int], LocalHop]


def plan_chain(connections: list[ScoutConnection], n_layers: int, fill: LocalFactory | None = None) -> list:
    """Scouts whose spans cover [0, n_layers) back to back, preferring the longest span at each
    step; gaps are filled by ``fill`` (the Oracle's own blocks) when given."""
    chain, position = [], 0
    while position < n_layers:
        candidates = [c for c in connections if c.span[0] == position]
        if not candidates and fill is not None:
            gap_end = min((c.span[0] for c in connections if c.span[0] > position), default=n_layers)
            chain.append(fill(position, gap_end))
            position = gap_end
            continue
        if not candidates:
            spans = sorted(c.span for c in connections)
            raise ScoutError(f"no Scout serves block {position}; the Scouts serve {spans} of {n_layers} blocks")
        best = max(candidates, key=lambda c: c.span[1])
        chain.append(best)
        position = best.span[1]
    return chain


class RemotePipeline:
    """The engine's Pipeline over a chain of Scouts. Called on the engine's thread; the network
    work runs on the event loop (``loop``) that owns the connections.

    Failover: the pipeline keeps each session's inputs to the first hop (its embedded tokens)
    and how they were fed (prompt chunks, then one token per step). When a hop's Scout becomes
    unreachable, a spare serving the same span takes its place, and every session's cache there is
    rebuilt from that history before the session's next step, in the same chunks, so the rebuilt
    cache is bit-identical to the lost one (a single prefill of the whole history would differ in
    the last bits, enough to flip near-tied tokens later). The client sees a pause, not an error.
    """

    def __init__(self, chain: list, loop: asyncio.AbstractEventLoop, wire_dtype: str = "float32",
                 spares: list[ScoutConnection] | None = None, fill: LocalFactory | None = None):
        self.chain = chain
        self.fill = fill
        self.spares = list(spares or [])
        self.loop = loop
        self.wire_dtype = wire_dtype
        self.history: dict[str, torch.Tensor] = {}
        self.chunks: dict[str, list[int]] = {}
        self.stale: dict[int, set[str]] = {}
        self.failovers = 0

    def _call(self, hop, method: str, *args):
        """A Scout's request runs on the event loop that owns its connection; a LocalHop right here."""
        if isinstance(hop, LocalHop):
            return getattr(hop, method)(*args)
        return asyncio.run_coroutine_threadsafe(getattr(hop, method)(*args), self.loop).result()

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        x = hidden
        for i in range(len(self.chain)):
            x = self._hop_forward(i, x, requests)
        offset = 0
        for r in requests:
            rows = hidden[offset:offset + r.n_tokens].float()
            offset += r.n_tokens
            before = self.history.get(r.session)
            self.history[r.session] = rows if before is None else torch.cat([before[: r.start], rows])
            self.chunks[r.session] = trim_chunks(self.chunks.get(r.session, []), r.start) + [r.n_tokens]
        return x.float()

    def _hop_forward(self, i: int, x: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        while True:
            try:
                self._replay(i, requests)
                return self._call(self.chain[i], "forward", x, requests, self.wire_dtype)
            except ScoutUnreachable as e:
                log.warning("hop %d: %s", i, e)
                self._replace_dead()

    def _replace_dead(self) -> None:
        for i, hop in enumerate(self.chain):
            if hop.dead:
                self._replace(i)

    def _replace(self, i: int) -> None:
        old = self.chain[i]
        spare = next((c for c in self.spares if c.span == old.span and not c.dead), None)
        if spare is not None:
            self.spares.remove(spare)
        elif self.fill is not None:
            spare = self.fill(*old.span)
        else:
            raise ScoutUnreachable(f"no Scout left for blocks [{old.span[0]}, {old.span[1]}) after {old.address.peer_id} failed")
        self.chain[i] = spare
        self.stale[i] = set(self.history)
        self.failovers += 1
        log.warning("blocks [%d, %d) moved from %s to %s; %d sessions will be replayed", old.span[0], old.span[1],
                    old.address.peer_id, spare.address.peer_id, len(self.stale[i]))

    def _replay(self, i: int, requests: list[SpanRequest]) -> None:
        stale = self.stale.get(i)
        if not stale:
            return
        for r in requests:
            if r.session not in stale:
                continue
            history = self.history.get(r.session)
            position = 0
            scratch = f"{r.session}~replay"
            for n in trim_chunks(self.chunks.get(r.session, []), r.start):
                x = history[position:position + n]
                for hop in self.chain[:i]:
                    x = self._call(hop, "forward", x, [SpanRequest(scratch, position, n)], self.wire_dtype)
                self._call(self.chain[i], "forward", x, [SpanRequest(r.session, position, n)], self.wire_dtype)
                position += n
            for hop in self.chain[:i]:
                self._call(hop, "free", scratch)
            stale.discard(r.session)

    def _each_hop(self, session: str, method: str, *args, also_stale: str | None = None) -> None:
        """Send one cache operation for ``session`` to every hop, except hops where its cache is
        due to be rebuilt anyway (there ``also_stale`` is marked for rebuilding too)."""
        for i in range(len(self.chain)):
            stale = self.stale.get(i, set())
            if session in stale:
                if also_stale is not None:
                    stale.add(also_stale)
                continue
            try:
                self._call(self.chain[i], method, *args)
            except ScoutUnreachable as e:
                log.warning("hop %d: %s", i, e)
                self._replace_dead()
                if also_stale is not None:
                    self.stale[i].add(also_stale)

    def rollback(self, session: str, length: int) -> None:
        if session in self.history:
            self.history[session] = self.history[session][:length]
            self.chunks[session] = trim_chunks(self.chunks[session], length)
        self._each_hop(session, "rollback", session, length)

    def fork(self, source: str, target: str) -> None:
        if source in self.history:
            self.history[target] = self.history[source]
            self.chunks[target] = list(self.chunks[source])
        self._each_hop(source, "fork", source, target, also_stale=target)

    def free(self, session: str) -> None:
        self.history.pop(session, None)
        self.chunks.pop(session, None)
        self._each_hop(session, "free", session)
        for stale in self.stale.values():
            stale.discard(session)
