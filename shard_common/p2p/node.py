"""A libp2p host (py-libp2p, trio) in a thread of its own, used from asyncio.

The control plane is small and slow (announcements once a second, a DHT lookup now and then), so
the bridge is simple: asyncio calls into trio through ``trio.from_thread.run`` on a worker thread,
and trio hands received messages to the asyncio loop with ``call_soon_threadsafe``.

Hazards of this library that the code below works around (all seen on this machine):
- an exception escaping a stream handler or a service task kills the whole host: every task here
  catches everything and logs it;
- a write cancelled mid-flight kills the connection: publishes are shielded;
- ``connect()`` waits 250 ms per dial unless ``max_connections_per_peer=1``;
- the default host also accepts plaintext: only Noise is offered;
- gossipsub silently drops messages over 1 MiB: callers check sizes (see announcements.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from shard_common.identity import Identity

log = logging.getLogger(__name__)

GOSSIP_PROTOCOLS = ["/meshsub/1.1.0", "/meshsub/1.0.0"]
Handler = Callable[[str, bytes], None]  # (sender peer id, message bytes), called on the asyncio loop


@dataclass
class P2PConfig:
    host: str = "127.0.0.1"
    port: int = 0
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = False
    redial_seconds: float = 2.0


def quiet_libp2p_logs(level: int) -> None:
    """py-libp2p logs routine events (a peer closing a DHT stream, its dialer's bookkeeping) as
    warnings and info, some on loggers with levels of their own, past our log format: route its
    records through our handlers and keep only critical ones unless ``level`` is debug (a failed
    dial is an ERROR there; this module logs what matters to an operator itself)."""
    import libp2p  # noqa: F401 - its import configures the "libp2p" logger; adjust after that

    logger = logging.getLogger("libp2p")
    logger.propagate = True
    if level <= logging.DEBUG:
        return

    def drop_chatter(record: logging.LogRecord) -> bool:
        return not record.name.startswith("libp2p") or record.levelno >= logging.CRITICAL

    for handler in logging.getLogger().handlers:
        handler.addFilter(drop_chatter)


class P2PNode:
    def __init__(self, identity: Identity, config: P2PConfig):
        self.identity = identity
        self.config = config
        self.addrs: list[str] = []
        self._handlers: dict[str, Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token = None
        self._stop = None  # trio.Event, made inside the trio thread
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._host = self._pubsub = self._dht = None

    # ---- asyncio side -------------------------------------------------------------------------

    async def start(self, topics: dict[str, Handler]) -> list[str]:
        """Start the host, subscribe ``topics`` (topic → handler), dial the bootstrap peers in the
        background; returns this node's full multiaddrs (``/ip4/.../tcp/.../p2p/PEER``)."""
        self._loop = asyncio.get_running_loop()
        self._handlers = dict(topics)
        started = threading.Event()
        self._thread = threading.Thread(target=self._run_trio, args=(started,), name="libp2p", daemon=True)
        self._thread.start()
        await asyncio.to_thread(started.wait)
        if self._failed is not None:
            raise RuntimeError(f"libp2p host failed to start: {self._failed!r}") from self._failed
        return self.addrs

    async def _call(self, fn: Callable[..., Awaitable], *args, timeout: float = 10.0):
        import trio

        async def bounded():
            with trio.fail_after(timeout):
                return await fn(*args)

        return await asyncio.to_thread(trio.from_thread.run, bounded, trio_token=self._token)

    async def publish(self, topic: str, data: bytes) -> None:
        await self._call(self._publish, topic, data)

    async def provide(self, key: str) -> bool:
        return await self._call(self._dht.provide, key, timeout=15.0)

    async def find_providers(self, key: str) -> list[tuple[str, list[str]]]:
        """Peers that announced ``key`` in the DHT: (peer id, their multiaddrs)."""
        return await self._call(self._find_providers, key, timeout=15.0)

    async def connect(self, multiaddr: str) -> str:
        """Dial a peer by its full multiaddr; returns its peer id."""
        return await self._call(self._connect, multiaddr)

    def connected_peers(self) -> set[str]:
        if self._host is None:
            return set()
        return {str(p) for p in self._host.get_network().connections}

    def observed_host(self, peer: str) -> str | None:
        """The IP address our libp2p connection to ``peer`` runs to: where it really is, as
        opposed to where it says it is. None without a direct connection."""
        if self._host is None:
            return None
        for peer_id, conns in list(self._host.get_network().connections.items()):
            if str(peer_id) != peer:
                continue
            for conn in conns if isinstance(conns, list) else [conns]:
                try:
                    address = conn.muxed_conn.get_remote_address()
                except Exception:  # a connection closing under us
                    continue
                if address:
                    return address[0]
        return None

    async def stop(self) -> None:
        if self._token is None or self._thread is None:
            return
        import trio

        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        except (RuntimeError, trio.RunFinishedError):
            pass
        await asyncio.to_thread(self._thread.join, 10)

    # ---- trio side ----------------------------------------------------------------------------

    def _run_trio(self, started: threading.Event) -> None:
        import trio

        try:
            trio.run(self._main, started)
        except BaseException as e:  # reported to start(), or logged if the host dies later
            if not started.is_set():
                self._failed = e
                started.set()
            else:
                log.error("libp2p host stopped: %r", e)

    def _make_host(self):
        import multiaddr
        from libp2p import create_yamux_muxer_option, new_host
        from libp2p.crypto.ed25519 import Ed25519PrivateKey
        from libp2p.crypto.keys import KeyPair
        from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
        from libp2p.network.config import ConnectionConfig
        from libp2p.security.noise.transport import PROTOCOL_ID as NOISE
        from libp2p.security.noise.transport import Transport as Noise

        private = Ed25519PrivateKey.from_bytes(self.identity.private_bytes())
        key_pair = KeyPair(private, private.get_public_key())
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE: Noise(key_pair, noise_privkey=new_x25519().private_key)},
            muxer_opt=create_yamux_muxer_option(),
            connection_config=ConnectionConfig(max_connections_per_peer=1),
            enable_mDNS=self.config.mdns,
        )
        listen = multiaddr.Multiaddr(f"/ip4/{self.config.host}/tcp/{self.config.port}")
        return host, listen

    async def _main(self, started: threading.Event) -> None:
        import trio
        from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
        from libp2p.pubsub.gossipsub import GossipSub
        from libp2p.pubsub.pubsub import Pubsub
        from libp2p.tools.anyio_service import background_trio_service

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        host, listen = self._make_host()
        # Mesh repair once a second so a restarted peer is back in the mesh within seconds;
        # everything runs on loopback in tests, so the IP-diversity guard would starve the mesh.
        gossip = GossipSub(protocols=GOSSIP_PROTOCOLS, degree=6, degree_low=4, degree_high=12, heartbeat_interval=1,
                           eclipse_protection_enabled=False, max_messages_per_topic_per_second=200.0)
        pubsub = Pubsub(host, gossip)
        # Message ids are (sender, counter), and py-libp2p starts the counter at the Unix time in
        # seconds. A Scout heartbeating twice a second outruns the clock, so after a restart its
        # new messages reuse ids of its previous life, and every peer drops them as already seen
        # (for the seen-cache's 120 s): the Oracle would not hear the restarted Scout for a minute
        # or more. Nanoseconds leave room for any plausible message rate.
        pubsub.counter = time.time_ns()
        async with host.run([listen]):
            dht = KadDHT(host, DHTMode.SERVER)
            async with background_trio_service(pubsub), background_trio_service(gossip), background_trio_service(dht):
                await pubsub.wait_until_ready()
                self._host, self._pubsub, self._dht = host, pubsub, dht
                self.addrs = [str(a) for a in host.get_addrs()]
                async with trio.open_nursery() as nursery:
                    for topic in self._handlers:
                        subscription = await pubsub.subscribe(topic)
                        nursery.start_soon(self._receive, topic, subscription)
                    nursery.start_soon(self._keep_bootstrap_peers)
                    started.set()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()

    async def _receive(self, topic: str, subscription) -> None:
        from libp2p.peer.id import ID

        while True:
            try:
                message = await subscription.get()
                sender = ID(message.from_id).to_base58()
                if sender == self.identity.peer_id:
                    continue
                self._loop.call_soon_threadsafe(self._deliver, topic, sender, bytes(message.data))
            except Exception:
                log.exception("dropping a message on %s", topic)

    def _deliver(self, topic: str, sender: str, data: bytes) -> None:
        try:
            self._handlers[topic](sender, data)
        except Exception:  # a bad message must not stop the node
            log.exception("handler for %s failed on a message from %s", topic, sender)

    async def _publish(self, topic: str, data: bytes) -> None:
        import trio

        with trio.CancelScope(shield=True):
            await self._pubsub.publish(topic, data)

    async def _connect(self, text: str) -> str:
        import multiaddr
        import trio
        from libp2p.peer.peerinfo import info_from_p2p_addr

        info = info_from_p2p_addr(multiaddr.Multiaddr(text))
        with trio.CancelScope(shield=True):
            await self._host.connect(info)
        try:
            await self._dht.add_peer(info.peer_id)
        except Exception as e:  # the routing table refreshes itself later; the connection stands
            log.debug("DHT did not take %s: %r", info.peer_id, e)
        return info.peer_id.to_base58()

    async def _find_providers(self, key: str) -> list[tuple[str, list[str]]]:
        found = await self._dht.find_providers(key)
        return [(p.peer_id.to_base58(), [f"{a}/p2p/{p.peer_id.to_base58()}" if "/p2p/" not in str(a) else str(a)
                                         for a in p.addrs]) for p in found]

    async def _keep_bootstrap_peers(self) -> None:
        """Dial every bootstrap peer we are not connected to, forever: that is how a Scout
        finds an Oracle that restarted."""
        import trio
        from libp2p.peer.id import ID

        failures: dict[str, str] = {}
        while True:
            connected = self.connected_peers()
            for address in self.config.bootstrap:
                if address.rsplit("/p2p/", 1)[-1] in connected:
                    continue
                try:
                    # This loop's pace is the backoff for bootstrap peers: libp2p's negative cache
                    # would keep a restarted Oracle undialable for a minute after one failed dial.
                    self._host.get_network().unblock_peer(ID.from_base58(address.rsplit("/p2p/", 1)[-1]))
                    with trio.fail_after(5):
                        await self._connect(address)
                    log.info("connected to bootstrap peer %s", address)
                    failures.pop(address, None)
                except Exception as e:  # a failed dial (or trio.TooSlowError) is retried later
                    if failures.get(address) != repr(e):
                        log.warning("cannot reach bootstrap peer %s: %r (retrying)", address, e)
                    failures[address] = repr(e)
            await trio.sleep(self.config.redial_seconds)
