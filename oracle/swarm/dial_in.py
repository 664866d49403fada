"""The Oracle's data-plane port for Scouts behind NAT: they dial in, prove who they are (the same
signature check as every data-plane handshake), and the Oracle sends its requests over the
connection they opened. The swarm decides whether it wants each one."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Awaitable, Callable

from oracle.trust.health import PeerHealth
from shard_common.dataplane import HandshakeError, accept, server_context
from shard_common.identity import Identity
from shard_common.wire import FrameError

from .connection import ScoutAddress, ScoutConnection, ScoutError

log = logging.getLogger(__name__)


class DialInListener:
    def __init__(self, identity: Identity, tls_dir: Path, host: str, port: int, health: PeerHealth, hop_timeout: float):
        self.identity = identity
        self.ssl, self.cert_der = server_context(identity, tls_dir)
        self.host, self.requested_port = host, port
        self.health = health
        self.hop_timeout = hop_timeout
        self.server: asyncio.Server | None = None
        self._adopt: Callable[[ScoutConnection], Awaitable[bool]] | None = None

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1] if self.server is not None else 0

    async def start(self, adopt: Callable[[ScoutConnection], Awaitable[bool]]) -> None:
        """Listen; ``adopt(conn)`` says whether the swarm keeps a Scout's connection."""
        self._adopt = adopt
        self.server = await asyncio.start_server(self._handle, self.host, self.requested_port, ssl=self.ssl)
        log.warning("data plane for Scouts behind NAT on %s:%d", self.host, self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        observed = (writer.get_extra_info("peername") or ("?", 0))[0]
        try:
            peer = await accept(reader, writer, self.identity, self.cert_der)
            conn = await ScoutConnection(ScoutAddress(peer, observed, 0), self.identity, self.hop_timeout, self.health,
                                         reached="scout-dialed").adopt(reader, writer)
        except (HandshakeError, FrameError, ScoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
            log.info("refused a data-plane connection from %s: %s", observed, e or repr(e))
            writer.close()
            return
        if not await self._adopt(conn):
            await conn.close()
            return
        # The connection lives as long as this handler: wait for it to end.
        while not conn.dead and not writer.is_closing():
            await asyncio.sleep(1.0)
