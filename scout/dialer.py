"""Behind NAT: the Scout opens the data-plane connection to the Oracle itself.

The Oracle cannot reach a Scout started with ``--no-listen`` (or one its dial-back found
unreachable: it lists those in its announcement). Such a Scout dials the Oracle's data-plane port
on the host its libp2p connection to the Oracle runs to, checks the Oracle's identity (TLS
certificate signed by the Oracle's key) and proves its own, then serves the Oracle's requests on
that connection exactly as on one the Oracle opened. A dropped connection is dialled again, with
backoff, for as long as it is wanted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from shard_common.dataplane import HandshakeError, connect
from shard_common.identity import Identity
from shard_common.wire import FrameError

from .server import SpanServer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OracleDataPlane:
    peer_id: str
    host: str
    port: int


class OracleDialer:
    BACKOFF_SECONDS = (0.5, 10.0)
    HANDSHAKE_SECONDS = 10.0

    def __init__(self, server: SpanServer, identity: Identity):
        self.server = server
        self.identity = identity
        self.target: OracleDataPlane | None = None
        self.connected = False
        self._task: asyncio.Task | None = None

    def want(self, target: OracleDataPlane | None) -> None:
        """Keep a connection to ``target`` (None: to no one)."""
        if target == self.target:
            return
        self.target = target
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if target is not None:
            self._task = asyncio.get_running_loop().create_task(self._keep(target))

    async def _keep(self, target: OracleDataPlane) -> None:
        pause = self.BACKOFF_SECONDS[0]
        while True:
            try:
                reader, writer, _ = await connect(target.host, target.port, self.identity, target.peer_id, self.HANDSHAKE_SECONDS)
            except (OSError, HandshakeError, FrameError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                log.warning("cannot dial the Oracle's data plane at %s:%d: %s", target.host, target.port, e or repr(e))
            else:
                log.warning("dialled the Oracle's data plane at %s:%d", target.host, target.port)
                pause = self.BACKOFF_SECONDS[0]
                self.connected = True
                try:
                    await self.server.serve_connection(reader, writer, target.peer_id)
                finally:
                    self.connected = False
                log.warning("data-plane connection to the Oracle closed; dialling again")
            await asyncio.sleep(pause)
            pause = min(self.BACKOFF_SECONDS[1], pause * 2)

    def stop(self) -> None:
        self.want(None)
