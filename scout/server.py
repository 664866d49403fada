"""The Scout's data plane: authenticated TLS connections with the Oracle (the Oracle's, or one the
Scout opened itself from behind NAT), serving one span, and with other Scouts relaying chained
forwards (scout/relay.py).

Every request is answered (a RESULT or an ERROR frame); nothing a peer sends can take the
server down. Tensor work runs on the process's main thread (see shard_common/main_thread.py),
one request at a time, so forwards and rollbacks of a session never interleave. A chained
forward's cache operations are applied when its request arrives, in the order the Oracle sent
them; its compute waits for its input in a task of its own, so the connection reads on.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from concurrent.futures import Executor
from pathlib import Path

from shard_common.dataplane import HandshakeError, accept, server_context
from shard_common.identity import Identity, reply_digest
from shard_common.model.kv_cache import KVBudgetExceeded, UnknownSession
from shard_common.model.span import SessionOutOfStep, Span, SpanRequest
from shard_common.cache_ops import apply_cache_ops
from shard_common.protocol import Error, Forward, Kind, Result, Welcome
from shard_common.wire import DTYPES, FrameError, read_frame, tensor_from_bytes, tensor_to_bytes, write_frame
from .faults import FaultInjector
from .relay import RelayFailed, Relays

log = logging.getLogger(__name__)

REQUEST_ERRORS = (SessionOutOfStep, KVBudgetExceeded, UnknownSession, ValueError)


class SpanServer:
    """Serves one span at a time. ``span`` is None until the Scout has loaded the span it was
    assigned; connections before that are refused with an ERROR frame (the Oracle retries)."""

    def __init__(self, span: Span | None, identity: Identity, model_name: str, executor: Executor, tls_dir: Path,
                 allowed_peers: set[str] | None = None, session_idle_seconds: float = 600.0, simulate_latency_ms: float = 0.0,
                 faults: FaultInjector | None = None):
        self.span = span
        self.identity = identity
        self.model_name = model_name
        self.executor = executor
        self.allowed_peers = allowed_peers
        self.ssl, self.cert_der = server_context(identity, tls_dir)
        self.server: asyncio.Server | None = None
        self.requests = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.draft = None  # a DraftModel when this Scout drafts (--role draft)
        self.session_idle_seconds = session_idle_seconds
        # Benchmarks only: every reply waits this long, as if the link to the Oracle were slow
        # (this machine's kernel has no netem to delay packets for real).
        self.simulate_latency_s = simulate_latency_ms / 1000
        self.faults = faults or FaultInjector()  # --inject-faults: testing a swarm's defences only
        self.relays = Relays(identity, refuse=self.faults.refuse_relays)
        self._expiry: asyncio.Task | None = None

    def set_draft_model(self, draft) -> None:
        """Serve as a draft Scout: ``draft`` (a DraftModel) answers DRAFT requests; its span holds
        the whole model, so forwards, rollbacks and closes work on it as on any span."""
        self.draft = draft
        self.set_span(draft.span, draft.name)

    def set_span(self, span: Span, model_name: str) -> None:
        """Serve ``span`` from now on. Connections made for the old span are closed: their
        sessions' caches are gone, and the Oracle replays them wherever it routes them next."""
        self.span, self.model_name = span, model_name
        for writer in list(self._writers):
            writer.close()

    async def start(self, host: str, port: int, listen: bool = True) -> None:
        """Listen on ``host:port`` (unless ``listen`` is False: behind NAT, the Scout dials out)."""
        if listen:
            self.server = await asyncio.start_server(self._handle, host, port, ssl=self.ssl)
        self._expiry = asyncio.get_running_loop().create_task(self._expire_idle_forever())

    async def _expire_idle_forever(self) -> None:
        """Free caches of sessions nobody has stepped for a while (an Oracle that vanished without
        closing them), so they cannot hold the KV budget forever."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(60.0, self.session_idle_seconds / 4))
            span = self.span
            if span is None:
                continue
            expired = await loop.run_in_executor(self.executor, span.kv.expire_idle, time.monotonic(), self.session_idle_seconds)
            if expired:
                log.warning("freed %d sessions idle for over %.0f s", len(expired), self.session_idle_seconds)

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        for writer in list(self._writers):
            writer.close()
        self.relays.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @property
    def port(self) -> int:
        """The listening port (0: not listening)."""
        return self.server.sockets[0].getsockname()[1] if self.server is not None else 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An Oracle connected to this Scout's listener."""
        try:
            peer = await accept(reader, writer, self.identity, self.cert_der)
        except (FrameError, HandshakeError) as e:
            log.warning("dropping connection from ?: %s", e)  # who it is was not proven
            writer.close()
            return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            writer.close()
            return
        await self.serve_connection(reader, writer, peer)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str) -> None:
        """Answer an authenticated peer's requests on this stream until it closes: an Oracle's (on
        a connection it opened, or one this Scout opened to an Oracle that cannot reach it:
        scout/dialer.py), or relays from a Scout before this one in a chain. A peer outside
        ``--allow-oracles`` may only relay (a relay is used only where an allowed Oracle said so)."""
        span = None
        sessions: set[str] = set()
        chained: set[asyncio.Task] = set()
        replies = asyncio.Lock()  # chained forwards answer from their own tasks: one frame at a time
        may_request = self.allowed_peers is None or peer in self.allowed_peers
        try:
            span = self.span
            if span is None:
                await write_frame(writer, Kind.ERROR, Error(code="no_span", message="this Scout has not loaded a span yet"))
                return
            self._writers.add(writer)
            await write_frame(writer, Kind.WELCOME, Welcome(
                peer_id=self.identity.peer_id, model=self.model_name, span=(span.start, span.end),
                n_layers=span.config.n_layers, wire_dtypes=list(DTYPES), role="draft" if self.draft else "span",
                vocab_digest=self.draft.vocab_digest if self.draft else None))
            log.info("serving %s", peer)
            while True:
                kind, message, body = await read_frame(reader)
                if self.span is not span:
                    break  # the Scout moved to another span: this connection's sessions are gone
                if kind == Kind.RELAY:
                    self.relays.deliver(peer, message, body)
                    continue
                if not may_request:
                    raise HandshakeError(f"peer {peer} is not allowed")
                if self.faults.hang:
                    self.faults.injected += 1
                    continue
                if kind == Kind.FORWARD and (message.source is not None or message.next is not None):
                    error = await self._apply_ops(span, message, sessions)
                    if error is None:
                        task = asyncio.get_running_loop().create_task(self._chained(span, message, body, peer, sessions, writer, replies))
                        chained.add(task)
                        task.add_done_callback(chained.discard)
                        continue
                    reply_kind, reply, reply_body = Kind.ERROR, error, b""
                else:
                    reply_kind, reply, reply_body = await self._dispatch(span, kind, message, body, sessions)
                await self._reply(writer, replies, reply_kind, reply, reply_body)
        except (FrameError, HandshakeError) as e:  # before ConnectionError: a HandshakeError is one
            log.warning("dropping connection from %s: %s", peer, e)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError):
            pass
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("error serving %s", peer)
        finally:
            for task in list(chained):
                task.cancel()
            writer.close()
            self._writers.discard(writer)
            if sessions and span is self.span:
                # The Oracle replays a session's tokens when it reconnects; keep no orphaned caches.
                await asyncio.get_running_loop().run_in_executor(self.executor, self._free_all, span, list(sessions))

    async def _delay(self) -> None:
        """--simulate-latency-ms (benchmarks) and --inject-faults delay_ms: every answer this Scout
        sends, a reply to the Oracle or a relay to the next Scout, leaves this much later."""
        if self.simulate_latency_s or self.faults.delay_s:
            await asyncio.sleep(self.simulate_latency_s + self.faults.delay_s)

    async def _reply(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, kind: Kind, reply, body: bytes = b"") -> None:
        await self._delay()
        async with lock:
            await write_frame(writer, kind, reply, body)

    async def _apply_ops(self, span: Span, message: Forward, sessions: set[str]) -> Error | None:
        if not message.ops:
            return None  # most steps: no hand-off to the main thread and back
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, apply_cache_ops, span, message.ops, sessions)
        except REQUEST_ERRORS as e:
            return Error(id=message.id, code=type(e).__name__, message=str(e))
        return None

    async def _chained(self, span: Span, message: Forward, body: bytes, oracle: str, sessions: set[str],
                       writer: asyncio.StreamWriter, replies: asyncio.Lock) -> None:
        """One hop of a chained forward: wait for the input (relayed by the Scout named as its
        source), compute, relay the output to the next Scout, and answer the Oracle: the output
        itself at the chain's end, else an acknowledgement with its signed digest. A chain that
        breaks here is reported with a code saying where."""
        loop = asyncio.get_running_loop()
        self.requests += 1
        try:
            if message.source is not None:
                arrival = await self.relays.expect(oracle, message.id, message.source)
                if (arrival.relay.dtype, arrival.relay.shape) != (message.dtype, message.shape):
                    raise RelayFailed("relay_refused", f"the relay carries {arrival.relay.dtype} {arrival.relay.shape}, "
                                                       f"the request {message.dtype} {message.shape}")
                body = arrival.body
            reply, payload = await loop.run_in_executor(self.executor, self._compute, span, message, body, sessions, self.faults,
                                                        self.identity)
            if message.next is not None:
                await self._delay()
                await self.relays.send(message.next, oracle, message.dtype, message.shape, payload)
                if not message.echo:
                    payload = b""  # the Oracle gets the digest; the next Scout has the output
            kind = Kind.RESULT
        except RelayFailed as e:
            kind, reply, payload = Kind.ERROR, Error(id=message.id, code=e.code, message=str(e)), b""
        except REQUEST_ERRORS as e:
            kind, reply, payload = Kind.ERROR, Error(id=message.id, code=type(e).__name__, message=str(e)), b""
        try:
            await self._reply(writer, replies, kind, reply, payload)
        except (OSError, ConnectionError):
            pass  # the Oracle's connection is gone: it reroutes and replays

    @staticmethod
    def _free_all(span: Span, sessions: list[str]) -> None:
        for s in sessions:
            span.free(s)

    async def _dispatch(self, span: Span, kind: Kind, message, body: bytes, sessions: set[str]):
        loop = asyncio.get_running_loop()
        self.requests += 1
        try:
            if kind == Kind.FORWARD:
                return await loop.run_in_executor(self.executor, self._forward, span, message, body, sessions, self.faults,
                                              self.identity)
            if kind == Kind.DRAFT:
                if self.draft is None:
                    return Kind.ERROR, Error(id=message.id, code="not_a_drafter", message="this Scout serves a span, not drafts"), b""
                drafted = await loop.run_in_executor(self.executor, self.draft.draft, message)
                drafted.tokens = self.faults.draft(drafted.tokens, self.draft.span.config.vocab_size)
                sessions.add(message.session)
                drafted.id = message.id
                return Kind.DRAFTED, drafted, b""
            if kind == Kind.CACHE:
                await loop.run_in_executor(self.executor, apply_cache_ops, span, message.ops, sessions)
            elif kind != Kind.PING:
                return Kind.ERROR, Error(id=message.id, code="unexpected_kind", message=f"{kind.name} is not a request"), b""
            return Kind.RESULT, Result(id=message.id), b""
        except REQUEST_ERRORS as e:
            return Kind.ERROR, Error(id=message.id, code=type(e).__name__, message=str(e)), b""

    @staticmethod
    def _forward(span: Span, message: Forward, body: bytes, sessions: set[str], faults: FaultInjector, identity: Identity):
        apply_cache_ops(span, message.ops, sessions)
        result, payload = SpanServer._compute(span, message, body, sessions, faults, identity)
        return Kind.RESULT, result, payload

    @staticmethod
    def _compute(span: Span, message: Forward, body: bytes, sessions: set[str], faults: FaultInjector,
                 identity: Identity) -> tuple[Result, bytes]:
        """The span's output for a forward (its cache operations already applied) and the signed reply."""
        t0 = time.perf_counter()
        total = sum(s.n_tokens for s in message.sessions)
        if message.shape != (total, span.config.d_model):
            raise ValueError(f"hidden states of shape {message.shape} for {total} tokens of width {span.config.d_model}")
        hidden = tensor_from_bytes(body, message.dtype, message.shape)
        requests = [SpanRequest(s.session, s.start, s.n_tokens) for s in message.sessions]
        out = faults.forward(hidden, span.forward(hidden, requests))
        sessions.update(r.session for r in requests)
        payload = tensor_to_bytes(out, message.dtype)
        result = Result(id=message.id, dtype=message.dtype, shape=tuple(out.shape), compute_ms=(time.perf_counter() - t0) * 1000,
                        signature=identity.sign(reply_digest(message.id, payload)).hex(),
                        input_sha256=hashlib.sha256(body).hexdigest(), output_sha256=hashlib.sha256(payload).hexdigest())
        return result, payload
