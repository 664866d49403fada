"""The Oracle's side of one data-plane connection to a Scout: authenticated, requests pipelined
(sent at once, answered in order by the Scout, matched to their replies by id), every outcome told
to ``PeerHealth`` (the one owner of each peer's health)."""

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
from shard_common.wire import FrameError, read_frame, tensor_from_bytes, tensor_to_bytes, write_frame


class ScoutError(RuntimeError):
    """A Scout answered a request with an error (``code``: the Scout's), or could not be reached."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class ScoutUnreachable(ScoutError):
    """The connection failed or timed out: the Scout is gone, route around it."""

    api_code = "no_route"


@dataclass(frozen=True)
class Sent:
    """A request on its way: its reply arrives in ``answer``."""

    kind: Kind
    answer: asyncio.Future
    at: float  # when it was sent


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
    """One authenticated connection. Requests go out as soon as they are made, so a micro-batch's
    forward waits at the Scout behind another's instead of a round trip away from it; a reader task
    hands each reply to its request. A request unanswered after ``timeout`` seconds (``serve
    --hop-timeout``) kills the connection, and with it every request still waiting on it."""

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
        self._write_lock = asyncio.Lock()  # one frame at a time on the stream
        self._waiting: dict[int, asyncio.Future] = {}  # request id → its reply, once read
        self._replies: asyncio.Task | None = None
        self._last_answer = 0.0  # when the latest reply came: a request sent earlier waited behind it
        self._closing = False
        self.dead = False
        self.requests = 0
        self.round_trips: dict[str, int] = {}  # per request kind
        self.last_ms = 0.0
        # Forward statistics: round trips vs the Scout's own compute time give the per-hop overhead.
        self.forwards = 0
        self.chained = 0  # forwards this Scout did as a hop of a chain (not timed: see record_forward)
        self.forward_ms = 0.0
        self.compute_ms = 0.0
        self.tokens = 0
        self.wire_bytes = 0
        self.ewma_ms: float | None = None  # forward round trip, smoothed: the routing weight
        self.last_used = 0.0
        self.last_reply: dict | None = None  # the last forward's signed output digest (evidence: tickets, chains)

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
        self._replies = asyncio.get_running_loop().create_task(self._read_replies(), name=f"replies from {self.peer_id}")
        return self

    async def close(self) -> None:
        self._closing = True
        if self._replies is not None:
            self._replies.cancel()
        # Closing an SSL stream twice leaves it unable even to refuse a write: close once.
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()

    def abort(self) -> None:
        """Cut the connection now (no TLS goodbye a frozen peer would never answer): a request
        waiting on it fails at once."""
        self.dead = True
        if self._writer is not None:
            self._writer.transport.abort()

    async def _read_replies(self) -> None:
        try:
            while True:
                kind, reply, body = await read_frame(self._reader)
                waiter = self._waiting.pop(reply.id, None)
                if waiter is None:  # the stream is out of step with our requests: nothing on it can be trusted
                    raise FrameError(f"a reply to request {reply.id}, which is not waiting")
                now = time.perf_counter()
                if not waiter.done():  # done: its request was given up (cancelled); the reply goes unread
                    waiter.set_result((kind, reply, body, self._last_answer, now))
                self._last_answer = now
        except (OSError, asyncio.IncompleteReadError, FrameError) as e:
            self._lose(Outcome.LOST, e)
        except asyncio.CancelledError:  # closed here: requests still waiting fail now, not at their timeout
            self._lose(Outcome.LOST, ConnectionAbortedError("the connection was closed"))
            raise

    def _lose(self, outcome: Outcome, error: BaseException) -> None:
        """The connection is gone: told to ``PeerHealth`` once, every waiting request fails."""
        if not self.dead and not self._closing:
            self.health.record(self.peer_id, outcome)
        self.dead = True
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(ScoutUnreachable(f"Scout {self.peer_id} failed: {error!r}"))
        self._waiting.clear()
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()

    async def _request(self, kind: Kind, message, body: bytes = b"", timeout: float | None = None):
        sent = await self.send(kind, message, body)
        return await self.answer(sent, timeout)

    async def send(self, kind: Kind, message, body: bytes = b"", request_id: int | None = None) -> "Sent":
        """Send a request now (under ``request_id`` from ``reserve``, else a new id); ``answer``
        waits for the reply."""
        peer = self.address.peer_id
        if self.dead or self._writer.is_closing():
            self.dead = True
            raise ScoutUnreachable(f"Scout {peer} is gone")
        message.id = request_id or next(self._ids)
        answer = self._waiting[message.id] = asyncio.get_running_loop().create_future()
        sent = Sent(kind, answer, time.perf_counter())
        try:
            async with self._write_lock:
                await write_frame(self._writer, kind, message, body)
        except OSError as e:
            self._lose(Outcome.LOST, e)
            raise ScoutUnreachable(f"Scout {peer} failed: {e!r}") from e
        return sent

    def reserve(self) -> int:
        """An id for a request this connection will carry later (a chained forward's next hop is
        told it before the request itself is sent)."""
        return next(self._ids)

    async def answer(self, sent: "Sent", timeout: float | None = None, lose_on_timeout: bool = True):
        """The reply to ``sent``: (message, body); ScoutError for an ERROR reply. Past ``timeout``
        the connection is given up, unless ``lose_on_timeout`` is False (the wait may have been for
        someone else: a chained hop waits for its input from the hop before it)."""
        peer = self.address.peer_id
        try:
            reply_kind, reply, reply_body, previous, answered = await asyncio.wait_for(sent.answer, timeout or self.timeout)
        except asyncio.TimeoutError as e:
            if not lose_on_timeout:
                raise
            self._lose(Outcome.TIMED_OUT, e)
            raise ScoutUnreachable(f"Scout {peer} failed: {e!r}") from e
        except (OSError, asyncio.IncompleteReadError) as e:
            self._lose(Outcome.LOST, e)
            raise ScoutUnreachable(f"Scout {peer} failed: {e!r}") from e
        name = sent.kind.name.lower()
        self.requests += 1
        self.round_trips[name] = self.round_trips.get(name, 0) + 1
        # From when the Scout could start on it: a request sent while another was being answered waited behind it.
        self.last_ms = (answered - max(sent.at, previous)) * 1000
        self.last_used = time.monotonic()
        self.health.record(peer, Outcome.ANSWERED)
        if reply_kind == Kind.ERROR:
            assert isinstance(reply, Error)
            raise ScoutError(f"Scout {peer}: {reply.code}: {reply.message}", reply.code)
        return reply, reply_body

    async def forward(self, hidden: torch.Tensor, requests: list[SpanRequest], dtype: str,
                      ops: list[CacheOp] | None = None) -> torch.Tensor:
        """The span's output for ``hidden``; ``ops`` are applied on the Scout first."""
        message = Forward(sessions=[SessionSlice(session=r.session, start=r.start, n_tokens=r.n_tokens) for r in requests],
                          dtype=dtype, shape=tuple(hidden.shape), ops=ops or [])
        payload = tensor_to_bytes(hidden, dtype)
        reply, body = await self._request(Kind.FORWARD, message, payload)
        self.record_forward(reply, hashlib.sha256(body).hexdigest(), hidden.shape[0], len(payload), len(body))
        return tensor_from_bytes(body, reply.dtype, reply.shape)

    def record_forward(self, reply, output_sha256: str, tokens: int, sent_bytes: int, received_bytes: int, timed: bool = True) -> None:
        """A forward done, and its signed digest kept as evidence. Only a hub forward's round trip
        is one the routing weight can use (a chained hop's answer waits on the hops before it):
        ``timed`` False counts it as chained."""
        self.last_reply = {"request_id": reply.id, "output_sha256": output_sha256, "signature": reply.signature}
        if timed:
            self.forwards += 1
            self.forward_ms += self.last_ms
            self.ewma_ms = self.last_ms if self.ewma_ms is None else 0.8 * self.ewma_ms + 0.2 * self.last_ms
            self.compute_ms += reply.compute_ms
        else:
            self.chained += 1
        self.tokens += tokens
        self.wire_bytes += sent_bytes + received_bytes

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
