"""The Oracle's side of the data plane: connections to Scouts, and a Pipeline that runs the
blocks hop by hop through a chain of them."""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

import torch

from shard_common.dataplane import connect
from shard_common.identity import Identity
from shard_common.model.span import SpanRequest
from shard_common.protocol import Close, Error, Fork, Forward, Kind, Ping, Rollback, SessionSlice, Welcome
from shard_common.wire import read_frame, tensor_from_bytes, tensor_to_bytes, write_frame

log = logging.getLogger(__name__)


class ScoutError(RuntimeError):
    """A Scout answered a request with an error, or could not be reached."""


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
        async with self._lock:
            message.id = next(self._ids)
            try:
                await write_frame(self._writer, kind, message, body)
                reply_kind, reply, reply_body = await asyncio.wait_for(read_frame(self._reader), self.timeout)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                raise ScoutError(f"Scout {self.address.peer_id} failed: {e!r}") from e
        if reply.id != message.id:
            raise ScoutError(f"Scout {self.address.peer_id} answered request {reply.id}, expected {message.id}")
        if reply_kind == Kind.ERROR:
            assert isinstance(reply, Error)
            raise ScoutError(f"Scout {self.address.peer_id}: {reply.code}: {reply.message}")
        return reply, reply_body

    async def forward(self, hidden: torch.Tensor, requests: list[SpanRequest], dtype: str) -> torch.Tensor:
        message = Forward(sessions=[SessionSlice(session=r.session, start=r.start, n_tokens=r.n_tokens) for r in requests],
                          dtype=dtype, shape=tuple(hidden.shape))
        reply, body = await self._request(Kind.FORWARD, message, tensor_to_bytes(hidden, dtype))
        return tensor_from_bytes(body, reply.dtype, reply.shape)

    async def rollback(self, session: str, length: int) -> None:
        await self._request(Kind.ROLLBACK, Rollback(session=session, length=length))

    async def fork(self, source: str, target: str) -> None:
        await self._request(Kind.FORK, Fork(source=source, target=target))

    async def free(self, session: str) -> None:
        await self._request(Kind.CLOSE, Close(session=session))

    async def ping(self) -> None:
        await self._request(Kind.PING, Ping())


def plan_chain(connections: list[ScoutConnection], n_layers: int) -> list[ScoutConnection]:
    """Scouts whose spans cover [0, n_layers) back to back, preferring the longest span at each step."""
    chain, position = [], 0
    while position < n_layers:
        candidates = [c for c in connections if c.span[0] == position]
        if not candidates:
            spans = sorted(c.span for c in connections)
            raise ScoutError(f"no Scout serves block {position}; the Scouts serve {spans} of {n_layers} blocks")
        best = max(candidates, key=lambda c: c.span[1])
        chain.append(best)
        position = best.span[1]
    return chain


class RemotePipeline:
    """The engine's Pipeline over a chain of Scouts. Called on the engine's thread; the network
    work runs on the event loop (``loop``) that owns the connections."""

    def __init__(self, chain: list[ScoutConnection], loop: asyncio.AbstractEventLoop, wire_dtype: str = "float32"):
        self.chain = chain
        self.loop = loop
        self.wire_dtype = wire_dtype

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        for hop in self.chain:
            hidden = self._run(hop.forward(hidden, requests, self.wire_dtype))
        return hidden.float()

    def rollback(self, session: str, length: int) -> None:
        for hop in self.chain:
            self._run(hop.rollback(session, length))

    def fork(self, source: str, target: str) -> None:
        for hop in self.chain:
            self._run(hop.fork(source, target))

    def free(self, session: str) -> None:
        for hop in self.chain:
            self._run(hop.free(session))
