"""Scout-to-Scout relays of chained forwards (Oracle → S1 → … → Sn → Oracle: n + 1 trips where
the hub path makes 2n).

Outgoing: one connection per next Scout, opened on first use with the same TLS handshake and
peer-id check as every data-plane connection (the Oracle names the peer id it expects there), on
which RELAY frames are pushed without replies.

Incoming: a RELAY is used only for a request the Oracle itself sent this Scout, naming the
relay's sender as the source of that request's hidden states; a relay from anyone else is
refused, so no peer can feed a session on the Oracle's behalf. The Oracle's request and the relay
race along different links: whichever comes second finds the first waiting here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from shard_common.dataplane import HandshakeError, connect
from shard_common.identity import Identity
from shard_common.protocol import Kind, NextHop, Relay
from shard_common.wire import FrameError, read_frame, write_frame

log = logging.getLogger(__name__)


class RelayFailed(ConnectionError):
    """A relay did not arrive as it should (``code`` says how), or could not be sent."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Arrival:
    sender: str
    relay: Relay
    body: bytes
    at: float


class Relays:
    # A next hop that cannot be reached costs the step this much once (then the link goes hub-only):
    # TCP, TLS and the greeting take well under a second between reachable hosts.
    HANDSHAKE_SECONDS = 5.0
    WAIT_SECONDS = 120.0  # a relay that has not come by then will not (its chain broke upstream)
    MAX_EARLY = 256  # relays that came before their request; beyond this (or MAX_EARLY_BYTES) the oldest go
    MAX_EARLY_BYTES = 64 * 1024 * 1024

    def __init__(self, identity: Identity, refuse: bool = False):
        self.identity = identity
        self.refuse = refuse  # testing only (--inject-faults refuse_relays=1): a Scout others cannot relay to
        self._out: dict[str, tuple[tuple[str, int], asyncio.StreamWriter]] = {}
        self._dialing: dict[str, asyncio.Lock] = {}
        self._watching: set[asyncio.Task] = set()  # held here: the loop keeps only weak references to tasks
        self._waiting: dict[tuple[str, int], tuple[str, asyncio.Future]] = {}
        self._early: OrderedDict[tuple[str, int], Arrival] = OrderedDict()
        self._early_bytes = 0
        self.sent = self.received = self.refused = 0

    # ---- sending ----------------------------------------------------------------------------------

    async def send(self, hop: NextHop, oracle: str, dtype: str, shape: tuple[int, int], body: bytes) -> None:
        """Push a chained forward's output to ``hop``; RelayFailed when it cannot be reached."""
        writer = await self._writer(hop)
        try:
            await write_frame(writer, Kind.RELAY, Relay(id=hop.id, oracle=oracle, dtype=dtype, shape=shape), body)
        except (OSError, ConnectionError) as e:
            self._drop(hop.peer_id, writer)
            raise RelayFailed("next_hop_unreachable", f"lost the connection to {hop.peer_id}: {e!r}") from e
        self.sent += 1

    async def _writer(self, hop: NextHop) -> asyncio.StreamWriter:
        address = (hop.host, hop.port)
        async with self._dialing.setdefault(hop.peer_id, asyncio.Lock()):
            known = self._out.get(hop.peer_id)
            if known is not None and known[0] == address and not known[1].is_closing():
                return known[1]
            try:
                reader, writer, _ = await connect(hop.host, hop.port, self.identity, hop.peer_id, self.HANDSHAKE_SECONDS)
                # Every data-plane server greets a connection: WELCOME, or ERROR when it has no span yet.
                kind, greeting, _ = await asyncio.wait_for(read_frame(reader), self.HANDSHAKE_SECONDS)
            except (OSError, HandshakeError, FrameError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                raise RelayFailed("next_hop_unreachable", f"cannot reach {hop.peer_id} at {hop.host}:{hop.port}: {e!r}") from e
            if kind != Kind.WELCOME:
                writer.close()
                raise RelayFailed("next_hop_unreachable", f"{hop.peer_id} greeted with {kind.name}: {getattr(greeting, 'message', '')}")
            self._out[hop.peer_id] = (address, writer)
            watch = asyncio.get_running_loop().create_task(self._watch(hop.peer_id, reader, writer))
            self._watching.add(watch)
            watch.add_done_callback(self._watching.discard)
            return writer

    async def _watch(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Relays get no replies; anything the next Scout sends back is an error, and then it closes."""
        try:
            while True:
                kind, message, _ = await read_frame(reader)
                log.warning("relay connection to %s: %s %s", peer, kind.name, getattr(message, "message", ""))
        except (OSError, FrameError, asyncio.IncompleteReadError):
            pass
        finally:
            self._drop(peer, writer)

    def _drop(self, peer: str, writer: asyncio.StreamWriter) -> None:
        if self._out.get(peer, (None, None))[1] is writer:
            del self._out[peer]
        writer.close()

    def close(self) -> None:
        for _, writer in self._out.values():
            writer.close()
        self._out.clear()

    # ---- receiving --------------------------------------------------------------------------------

    def deliver(self, sender: str, relay: Relay, body: bytes) -> None:
        """A RELAY frame from the authenticated peer ``sender``."""
        key = (relay.oracle, relay.id)
        waiting = self._waiting.get(key)
        if self.refuse:
            self.refused += 1
            if waiting is not None and not waiting[1].done():
                waiting[1].set_exception(RelayFailed("relay_refused", "this Scout refuses relays (--inject-faults)"))
            raise ConnectionRefusedError("relays are refused here")
        if waiting is None:
            self._early[key] = Arrival(sender, relay, body, time.monotonic())
            self._early_bytes += len(body)
            while len(self._early) > self.MAX_EARLY or self._early_bytes > self.MAX_EARLY_BYTES:
                self._early_bytes -= len(self._early.popitem(last=False)[1].body)
            return
        source, future = waiting
        if sender != source:
            self.refused += 1
            log.warning("refused a relay from %s for a request whose input comes from %s", sender, source)
            if not future.done():
                future.set_exception(RelayFailed("relay_refused", f"a relay came from {sender}, not from {source}"))
            return
        if not future.done():
            self.received += 1
            future.set_result(Arrival(sender, relay, body, time.monotonic()))

    async def expect(self, oracle: str, request_id: int, source: str) -> Arrival:
        """The relay for ``oracle``'s request ``request_id``, from ``source`` and no one else."""
        key = (oracle, request_id)
        future = asyncio.get_running_loop().create_future()
        self._waiting[key] = (source, future)
        try:
            early = self._early.pop(key, None)
            if early is not None:
                self._early_bytes -= len(early.body)
                self.deliver(early.sender, early.relay, early.body)
            return await asyncio.wait_for(future, self.WAIT_SECONDS)
        except asyncio.TimeoutError:
            raise RelayFailed("relay_timeout", f"no relay from {source} within {self.WAIT_SECONDS:.0f} s") from None
        finally:
            self._waiting.pop(key, None)

    def status(self) -> dict:
        return {"sent": self.sent, "received": self.received, "refused": self.refused, "waiting": len(self._waiting)}
