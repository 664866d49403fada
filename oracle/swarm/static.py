"""A fixed set of Scouts given on the command line, chained to cover every block.

The engine's Pipeline until discovery over libp2p exists: the chain is planned once at startup.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from shard_common.identity import Identity
from shard_common.model.span import SpanRequest

from .remote import (
    LocalFactory, LocalHop, RemotePipeline, ScoutAddress, ScoutConnection, ScoutError, ScoutUnreachable, plan_chain,
)

log = logging.getLogger(__name__)


class StaticSwarm:
    """Connects to the given Scouts in the background, retrying those it cannot reach, and plans
    the chain once their spans cover every block. Until then (or when a span has lost every
    Scout) requests get 503 ``no_route`` with the reason. A Scout that comes back at its address
    with the same identity rejoins as a spare."""

    RETRY_SECONDS = 1.0

    def __init__(self, addresses: list[ScoutAddress], identity: Identity, wire_dtype: str = "float32",
                 fill: LocalFactory | None = None):
        self.addresses = addresses
        self.fill = fill  # --fallback-local: the Oracle computes spans no Scout serves
        self.identity = identity
        self.wire_dtype = wire_dtype
        self.connections: list[ScoutConnection] = []
        self.pipeline: RemotePipeline | None = None
        self.problem = "connecting to the Scouts"
        self._task: asyncio.Task | None = None

    async def connect(self, n_layers: int) -> None:
        self._task = asyncio.get_running_loop().create_task(self._maintain(n_layers))

    async def _maintain(self, n_layers: int) -> None:
        failures: dict[ScoutAddress, str] = {}
        while True:
            live = {c.address for c in self.connections if not c.dead}
            for address in [a for a in self.addresses if a not in live]:
                try:
                    conn = await ScoutConnection(address, self.identity).open()
                except Exception as e:  # unreachable, wrong identity, bad handshake: try again later
                    if failures.get(address) != str(e):
                        log.warning("cannot use Scout %s: %s", address, e)
                    failures[address] = str(e)
                    continue
                failures.pop(address, None)
                self.connections = [c for c in self.connections if c.address != address] + [conn]
                if self.pipeline is not None:
                    self.pipeline.spares.append(conn)
            if self.pipeline is not None:
                # Spares carry no traffic, so nothing else would notice one dying: ping them.
                for spare in list(self.pipeline.spares):
                    try:
                        await spare.ping()
                    except ScoutError:
                        log.warning("spare Scout %s is gone", spare.address.peer_id)
                self.pipeline.spares[:] = [c for c in self.pipeline.spares if not c.dead]
            if self.pipeline is None:
                try:
                    chain = plan_chain([c for c in self.connections if not c.dead], n_layers, self.fill)
                except ScoutError as e:
                    self.problem = str(e)
                else:
                    spares = [c for c in self.connections if c not in chain and not c.dead]
                    self.pipeline = RemotePipeline(chain, asyncio.get_running_loop(), self.wire_dtype, spares, self.fill)
                    log.warning("Oracle %s runs blocks on %s", self.identity.peer_id,
                                " → ".join(f"{c.address.peer_id[-8:]}[{c.span[0]}:{c.span[1]})" for c in chain))
            await asyncio.sleep(self.RETRY_SECONDS)

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for c in self.connections:
            await c.close()

    def status(self) -> dict:
        """Who serves which blocks, for /v1/cluster/status."""
        pipeline = self.pipeline
        chain = pipeline.chain if pipeline else []
        spares = pipeline.spares if pipeline else []
        scouts = []
        for c in self.connections:
            state = "dead" if c.dead else "active" if c in chain else "spare" if c in spares else "unused"
            scouts.append({"peer_id": c.address.peer_id, "address": f"{c.address.host}:{c.address.port}",
                           "span": list(c.span), "state": state, "requests": c.requests,
                           "last_ms": round(c.last_ms, 3), "forwards": c.forwards,
                           "overhead_ms": round((c.forward_ms - c.compute_ms) / c.forwards, 3) if c.forwards else None,
                           "tokens_forwarded": c.tokens, "wire_bytes": c.wire_bytes})
        return {
            "oracle_peer_id": self.identity.peer_id,
            "wire_dtype": self.wire_dtype,
            "chain": [c.address.peer_id for c in chain],
            "local_spans": [list(c.span) for c in chain if isinstance(c, LocalHop)],
            "scouts": scouts,
            "failovers": pipeline.failovers if pipeline else 0,
            "sessions": len(pipeline.history) if pipeline else 0,
        }

    def _ready(self) -> RemotePipeline:
        if self.pipeline is None:
            raise ScoutUnreachable(f"no route through the swarm yet: {self.problem}")
        return self.pipeline

    def forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> torch.Tensor:
        return self._ready().forward(hidden, requests)

    def rollback(self, session: str, length: int) -> None:
        self._ready().rollback(session, length)

    def fork(self, source: str, target: str) -> None:
        self._ready().fork(source, target)

    def free(self, session: str) -> None:
        self._ready().free(session)
