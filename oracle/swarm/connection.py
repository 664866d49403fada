"""The Oracle's side of one data-plane connection to a Scout: authenticated, one request at a
time, every outcome told to ``PeerHealth`` (the one owner of each peer's health)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from dataclasses import dataclass

import torch

from oracle.trust.health import Outcome, PeerHealth
from shard_common.dataplane import connect
from shard_common.identity import Identity
from shard_common.model.span import SpanRequest
from shard_common.protocol import CacheOp, CacheOps, Draft, Drafted, Error, Forward, Kind, Ping, SessionSlice, Welcome
from shard_common.wire import read_frame, tensor_from_bytes, tensor_to_bytes, write_frame


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
    local = False  # a hop of the Oracle's own blocks says True

    def __init__(self, address: ScoutAddress, identity: Identity, timeout: float = 30.0, health: PeerHealth | None = None,
                 reached: str = "direct"):
        self.address = address
        self.identity = identity
        self.timeout = timeout
        self.health = health or PeerHealth()
        self.welcome: Welcome | None = None
        self.reached = reached  # "direct", or "scout-dialed": the Scout opened this connection (it is behind NAT)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self.dead = False
        self.requests = 0
        self.round_trips: dict[str, int] = {}  # per request kind
        self.last_ms = 0.0
        # Forward statistics: round trips vs the Scout's own compute time give the per-hop overhead.
        self.forwards = 0
        self.forward_ms = 0.0
        self.compute_ms = 0.0
        self.tokens = 0
        self.wire_bytes = 0
        self.ewma_ms: float | None = None  # forward round trip, smoothed: the routing weight
        self.last_used = 0.0
        self.last_reply: dict | None = None  # the last forward reply's signed digest (evidence for tickets)

    @property
    def peer_id(self) -> str:
        return self.address.peer_id

    @property
    def span(self) -> tuple[int, int]:
        return self.welcome.span

    @property
    def role(self) -> str:
        return self.welcome.role

    @property
    def latency_ms(self) -> float | None:
        return self.ewma_ms

    async def open(self) -> "ScoutConnection":
        a = self.address
        handshake = min(self.timeout, self.HANDSHAKE_SECONDS)
        try:
            reader, writer, _ = await connect(a.host, a.port, self.identity, a.peer_id, handshake)
        except asyncio.TimeoutError:
            self.health.record(a.peer_id, Outcome.TIMED_OUT)  # it accepts but never completes a handshake
            raise
        return await self.adopt(reader, writer, handshake)

    async def adopt(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handshake: float | None = None) -> "ScoutConnection":
        """Use an authenticated stream pair (opened here, or by the Scout): read its WELCOME."""
        self._reader, self._writer = reader, writer
        try:
            kind, welcome, _ = await asyncio.wait_for(read_frame(reader), handshake or self.HANDSHAKE_SECONDS)
        except BaseException:
            writer.close()
            raise
        if kind != Kind.WELCOME:
            writer.close()
            raise ScoutError(f"{self.address.peer_id} answered the handshake with {kind.name}")
        self.welcome = welcome
        self.health.record(self.address.peer_id, Outcome.CONNECTED)
        return self

    async def close(self) -> None:
        # Closing an SSL stream twice leaves it unable even to refuse a write: close once.
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()

    def abort(self) -> None:
        """Cut the connection now (no TLS goodbye a frozen peer would never answer): a request
        waiting on it fails at once."""
        self.dead = True
        if self._writer is not None:
            self._writer.transport.abort()

    async def _request(self, kind: Kind, message, body: bytes = b"", timeout: float | None = None):
        peer = self.address.peer_id
        if self.dead:
            raise ScoutUnreachable(f"Scout {peer} is gone")
        async with self._lock:
            if self.dead or self._writer.is_closing():  # closed while this request waited for the lock
                self.dead = True
                raise ScoutUnreachable(f"Scout {peer} is gone")
            message.id = next(self._ids)
            started = time.perf_counter()
            try:
                await write_frame(self._writer, kind, message, body)
                reply_kind, reply, reply_body = await asyncio.wait_for(read_frame(self._reader), timeout or self.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                self.dead = True
                self.health.record(peer, Outcome.TIMED_OUT if isinstance(e, asyncio.TimeoutError) else Outcome.LOST)
                await self.close()
                raise ScoutUnreachable(f"Scout {peer} failed: {e!r}") from e
            self.requests += 1
            self.round_trips[kind.name.lower()] = self.round_trips.get(kind.name.lower(), 0) + 1
            self.last_ms = (time.perf_counter() - started) * 1000
            self.last_used = time.monotonic()
        self.health.record(peer, Outcome.ANSWERED)
        if reply.id != message.id:
            raise ScoutError(f"Scout {peer} answered request {reply.id}, expected {message.id}")
        if reply_kind == Kind.ERROR:
            assert isinstance(reply, Error)
            raise ScoutError(f"Scout {peer}: {reply.code}: {reply.message}")
        return reply, reply_body

    async def forward(self, hidden: torch.Tensor, requests: list[SpanRequest], dtype: str,
                      ops: list[CacheOp] | None = None) -> torch.Tensor:
        """The span's output for ``hidden``; ``ops`` are applied on the Scout first."""
        message = Forward(sessions=[SessionSlice(session=r.session, start=r.start, n_tokens=r.n_tokens) for r in requests],
                          dtype=dtype, shape=tuple(hidden.shape), ops=ops or [])
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

    async def cache(self, ops: list[CacheOp]) -> None:
        await self._request(Kind.CACHE, CacheOps(ops=ops))

    async def free(self, session: str) -> None:
        await self.cache([CacheOp(op="close", session=session)])

    async def ping(self, timeout: float | None = None) -> None:
        await self._request(Kind.PING, Ping(), timeout=timeout)

    async def draft(self, request: Draft, timeout: float) -> Drafted:
        """k proposals from a draft Scout; past ``timeout`` the connection is given up (a frame
        stream cannot be resynchronised) and the Swarm reconnects in the background."""
        reply, _ = await self._request(Kind.DRAFT, request, timeout=timeout)
        return reply
