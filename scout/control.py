"""The Scout's control plane: announce itself over gossipsub once a second (the heartbeat), follow
the span the Oracle assigns, and find the Oracle through the DHT when no bootstrap peer leads to it."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Callable

from shard_common.identity import Identity
from shard_common.model.span import Span
from shard_common.p2p.announcements import (
    ORACLE_DHT_KEY, ORACLE_TOPIC, SCOUT_TOPIC, AnnouncementError, Capabilities, OracleAnnouncement, ScoutAnnouncement,
    decode, encode, proof_problem, prove, replayed,
)
from shard_common.p2p.node import P2PConfig, P2PNode

from .dialer import OracleDataPlane, OracleDialer
from .server import SpanServer

log = logging.getLogger(__name__)

# Loads blocks [start, end) of the shard set the Oracle announced; blocking (runs on the executor).
SpanLoader = Callable[[OracleAnnouncement, int, int], Span]


class ScoutControl:
    def __init__(self, identity: Identity, p2p: P2PConfig, server: SpanServer, executor: Executor, load_span: SpanLoader,
                 data_host: str, capabilities: Capabilities, model: str | None = None,
                 allowed_oracles: set[str] | None = None, heartbeat_seconds: float = 1.0,
                 load_draft: Callable[[OracleAnnouncement], object] | None = None, swarm_secret: str | None = None,
                 dialer: OracleDialer | None = None):
        self.identity = identity
        self.node = P2PNode(identity, p2p)
        self.server = server
        self.executor = executor
        self.load_span = load_span
        self.load_draft = load_draft  # set for a draft Scout (--role draft): loads its whole model
        self.swarm_secret = swarm_secret  # private swarm: prove it, and follow only Oracles that prove it
        self.dialer = dialer  # opens the data-plane connection when the Oracle cannot (None: never)
        self._ignored: set[str] = set()
        self.data_host = data_host
        self.capabilities = capabilities
        self.model = model  # shard set id of the span being served (None: none yet)
        self.allowed_oracles = allowed_oracles
        self.heartbeat_seconds = heartbeat_seconds
        self.state = "serving" if server.span is not None else "idle"
        self.oracle: OracleAnnouncement | None = None
        self._seq = 0
        self._requests_seen = 0
        self._loading: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> list[str]:
        addrs = await self.node.start({ORACLE_TOPIC: self._on_oracle})
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._announce_forever()), loop.create_task(self._find_oracle_forever())]
        return addrs

    async def stop(self) -> None:
        if self.dialer is not None:
            self.dialer.stop()
        for t in self._tasks + ([self._loading] if self._loading else []):
            t.cancel()
        await self.node.stop()

    @property
    def span(self) -> tuple[int, int] | None:
        s = self.server.span
        return (s.start, s.end) if s is not None else None

    def announcement(self) -> ScoutAnnouncement:
        self._seq += 1
        span = self.server.span
        load = (self.server.requests - self._requests_seen) / self.heartbeat_seconds
        self._requests_seen = self.server.requests
        draft = self.server.draft
        return prove(self.swarm_secret, ScoutAnnouncement(
            peer_id=self.identity.peer_id, seq=self._seq, data_host=self.data_host, data_port=self.server.port,
            listening=self.server.server is not None,
            role="draft" if self.load_draft else "span", vocab_digest=draft.vocab_digest if draft else None,
            model=self.model, span=self.span, state=self.state, capabilities=self.capabilities,
            sessions=len(span.kv.sessions) if span else 0, load=load, free_kv_bytes=span.kv.free_bytes if span else 0))

    async def announce(self) -> None:
        await self.node.publish(SCOUT_TOPIC, encode(self.announcement()))

    async def _announce_forever(self) -> None:
        while True:
            try:
                await self.announce()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # no peers yet, or a hiccup: the next heartbeat tries again
                log.warning("announcement not sent: %r", e)
            await asyncio.sleep(self.heartbeat_seconds)

    async def _find_oracle_forever(self) -> None:
        """Look the Oracle up in the DHT once joined, and again whenever this Scout holds no direct
        connection to it: gossip relayed by other Scouts reaches it too, but a relay can leave."""
        looked_up = False
        while True:
            await asyncio.sleep(self.heartbeat_seconds * 2)
            if looked_up and self.oracle is not None and self.oracle.peer_id in self.node.connected_peers():
                continue
            try:
                providers = await self.node.find_providers(ORACLE_DHT_KEY)
            except Exception as e:
                log.debug("DHT lookup failed: %r", e)
                continue
            for peer, addrs in providers:
                if peer == self.identity.peer_id:
                    continue
                looked_up = True
                if peer in self.node.connected_peers():
                    log.warning("found Oracle %s through the DHT (already connected)", peer)
                    continue
                for addr in addrs:
                    try:
                        await self.node.connect(addr)
                    except Exception as e:
                        log.debug("cannot dial %s: %r", addr, e)
                        continue
                    log.warning("found Oracle %s through the DHT at %s", peer, addr)
                    break

    def _on_oracle(self, sender: str, data: bytes) -> None:
        try:
            a = decode(OracleAnnouncement, sender, data)
        except AnnouncementError as e:
            log.warning("ignored announcement: %s", e)
            return
        if self.allowed_oracles is not None and sender not in self.allowed_oracles:
            return
        if problem := proof_problem(self.swarm_secret, a):
            if sender not in self._ignored:
                log.warning("ignoring Oracle %s: %s", sender, problem)
                self._ignored.add(sender)
            return
        if self.oracle is not None and self.oracle.peer_id == sender and replayed(a, self.oracle):
            log.debug("ignored a replayed announcement of Oracle %s (seq %d, last %d)", sender, a.seq, self.oracle.seq)
            return
        if self.oracle is None or self.oracle.peer_id != sender:
            log.warning("following Oracle %s (model %s, %d blocks)", sender, a.model_name, a.n_layers)
        self.oracle = a
        self._dial_if_unreachable(a)
        if self.load_draft is not None:
            if self.server.draft is None and self._loading is None:
                self._loading = asyncio.get_running_loop().create_task(self._load_draft(a))
            return
        wanted = a.assignments.get(self.identity.peer_id)
        if wanted is None or (tuple(wanted) == self.span and a.model == self.model) or self._loading is not None:
            return
        self._loading = asyncio.get_running_loop().create_task(self._switch(a, tuple(wanted)))

    def _dial_if_unreachable(self, oracle: OracleAnnouncement) -> None:
        """Serving, and the Oracle cannot open the data-plane connection (this Scout does not
        listen, or the Oracle's dial-back failed): open it from here, to where the libp2p
        connection to the Oracle runs."""
        if self.dialer is None:
            return
        unreachable = self.server.server is None or self.identity.peer_id in oracle.dial_in
        host = self.node.observed_host(oracle.peer_id)
        if self.state == "serving" and unreachable and oracle.data_port and host:
            self.dialer.want(OracleDataPlane(oracle.peer_id, host, oracle.data_port))
        elif not unreachable or not oracle.data_port:
            self.dialer.want(None)

    async def _load_draft(self, oracle: OracleAnnouncement) -> None:
        log.warning("loading %s to draft for Oracle %s", oracle.model_name, oracle.peer_id)
        self.state = "loading"
        try:
            draft = await asyncio.get_running_loop().run_in_executor(self.executor, self.load_draft, oracle)
            self.server.set_draft_model(draft)
            self.model, self.state = oracle.model, "serving"
            await self.announce()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not load the draft model")
            self.state = "idle"
        finally:
            self._loading = None

    async def _switch(self, oracle: OracleAnnouncement, span: tuple[int, int]) -> None:
        log.warning("assigned blocks [%d, %d) of %s: loading", span[0], span[1], oracle.model_name)
        self.state = "loading"
        try:
            await self.announce()
            loaded = await asyncio.get_running_loop().run_in_executor(self.executor, self.load_span, oracle, *span)
            self.server.set_span(loaded, oracle.model_name)
            self.model = oracle.model
            self.state = "serving"
            log.warning("serving blocks [%d, %d) (%.0f block-tokens/s)", span[0], span[1], self.capabilities.throughput or 0)
            await self.announce()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("could not load blocks [%d, %d)", *span)
            self.state = "serving" if self.server.span is not None else "idle"
        finally:
            self._loading = None
