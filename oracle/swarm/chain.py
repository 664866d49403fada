"""Chained forwards: a step through consecutive Scouts travels Oracle → S1 → S2 → … → Sn → Oracle,
n + 1 trips where the hub path (Oracle → S1 → Oracle → S2 → …) makes 2n.

The Oracle sends every hop of the chain its request at once: the first with the hidden states,
the others naming the Scout their input comes from (``source``) and, but for the last, where
their output goes (``next``: the next Scout's address as the Oracle reached it, its peer id, and
the id of the request it holds for this step). Each hop relays its output over its own
authenticated connection to the next (scout/relay.py) and answers the Oracle with the signed
digests of what it received and what it sent; the last answers with the output. The Oracle checks
that consecutive hops agree (hop k received what hop k-1 says it sent), so per-hop evidence is
kept, and it waits for the answers in order: hop k's answer is due within the hop timeout after
hop k-1's, so a hop that does not answer is told apart from one whose input never came.

- ``chain_length`` (pure) decides how far a step may chain from a hop: only Scouts the Oracle
  reached at an address it dialed (one behind NAT has none to give), never the Oracle's own
  blocks, never a hop whose forward the traffic audit must see (input and output), never across
  a pair that could not relay lately (``ChainBreaks``), never a hop that may not carry traffic
  now (the hub path meets it and routes around it).
- ``run_chain`` runs one step down a chain; ``ChainBroken`` says where it broke: at a hop (its
  connection failed: route around it) or at a link between two (relay them by hub for a while).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from shard_common.model.span import SpanRequest
from shard_common.protocol import CacheOp, Forward, Kind, NextHop, SessionSlice
from shard_common.wire import tensor_from_bytes, tensor_to_bytes

from .connection import ScoutError, ScoutUnreachable

# How a hop reports that its chain broke at a link, and which link: next_hop_unreachable names the
# one after it, the others the one before it.
AFTER = {"next_hop_unreachable"}
BEFORE = {"relay_refused", "relay_timeout"}


@dataclass(frozen=True)
class Link:
    """What the choice of a chain knows of one hop of a route."""

    peer_id: str
    local: bool = False  # the Oracle's own blocks
    dialable: bool = True  # the Oracle dialed it (a Scout that dialed in from behind NAT cannot be relayed to)
    checked: bool = False  # the traffic audit must see this forward's input and output
    stale: bool = False  # a session's cache there is to be rebuilt before the step
    usable: bool = True  # it may carry traffic now (alive, not quarantined): if not, the hub path reroutes around it


def chain_length(links: Sequence[Link], broken: Callable[[str, str], bool]) -> int:
    """How many hops from ``links[0]`` on one step may travel as a chain (1: the hub path)."""
    if not links or links[0].local or links[0].checked:
        return 1
    n = 1
    for before, hop in zip(links, links[1:]):
        if hop.local or hop.checked or hop.stale or not hop.dialable or not hop.usable or broken(before.peer_id, hop.peer_id):
            break
        n += 1
    return n


class ChainBreaks:
    """Pairs of Scouts that could not relay to each other: for a while their link is left to the
    hub path (60 s, doubling at every new break up to an hour, forgotten after a success)."""

    FIRST_SECONDS = 60.0
    MAX_SECONDS = 3600.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._until: dict[tuple[str, str], tuple[float, float]] = {}  # pair → (until, last pause)
        self.breaks = 0

    def broken(self, a: str, b: str) -> bool:
        until = self._until.get((a, b))
        return until is not None and self.clock() < until[0]

    def record(self, a: str, b: str) -> None:
        self.breaks += 1
        pause = min(self.MAX_SECONDS, self._until[(a, b)][1] * 2) if (a, b) in self._until else self.FIRST_SECONDS
        self._until[(a, b)] = (self.clock() + pause, pause)

    def healed(self, a: str, b: str) -> None:
        self._until.pop((a, b), None)

    def status(self) -> dict:
        now = self.clock()
        return {"breaks": self.breaks,
                "hub_only": [{"from_peer": a, "to_peer": b, "seconds_left": round(u - now, 1)} for (a, b), (u, _) in self._until.items() if u > now]}


class ChainBroken(ScoutUnreachable):
    """A chained step did not come through. ``at``: the hop that failed (``link`` False: its
    connection is gone or it hung), or whose input did not reach it (``link`` True: the pair
    ``at - 1``, ``at`` could not relay). ``unsent``: hops whose request (and cache operations)
    never left the Oracle."""

    def __init__(self, message: str, at: int, link: bool, unsent: Sequence[int] = ()):
        super().__init__(message)
        self.at, self.link, self.unsent = at, link, list(unsent)


@dataclass
class ChainStats:
    passes: int = 0  # steps that went through a chain
    hops: int = 0  # hops they went through
    fallbacks: int = 0  # chained steps that broke and went the hub way
    overhead_ms: float = 0.0  # their wall time minus the Scouts' compute: trips, relays, frames, hand-offs

    def status(self) -> dict:
        return {"passes": self.passes, "hops": self.hops, "fallbacks": self.fallbacks,
                "overhead_ms_per_hop": round(self.overhead_ms / self.hops, 3) if self.hops else None}


async def run_chain(hops: Sequence, x: torch.Tensor, requests: list[SpanRequest], dtype: str,
                    ops: Sequence[list[CacheOp]], stats: ChainStats | None = None, echo: bool = False) -> list[torch.Tensor | None]:
    """Every hop's output for ``x`` through ``hops`` (ScoutConnections, in route order): the last
    always, the others only with ``echo`` (None otherwise); ``ops[k]`` ride on hop k's request.
    Raises ChainBroken."""
    n = len(hops)
    sessions = [SessionSlice(session=r.session, start=r.start, n_tokens=r.n_tokens) for r in requests]
    ids = [hop.reserve() for hop in hops]
    messages = [Forward(sessions=sessions, dtype=dtype, shape=tuple(x.shape), ops=ops[k],
                        source=hops[k - 1].peer_id if k else None,
                        next=NextHop(peer_id=hops[k + 1].peer_id, host=hops[k + 1].address.host, port=hops[k + 1].address.port,
                                     id=ids[k + 1]) if k + 1 < n else None, echo=echo)
                for k in range(n)]
    payload = tensor_to_bytes(x, dtype)
    started = time.perf_counter()
    sent: list = [None] * n
    # The later hops first: their requests should be waiting there when the relays come.
    for k in reversed(range(n)):
        try:
            sent[k] = await hops[k].send(Kind.FORWARD, messages[k], payload if k == 0 else b"", ids[k])
        except ScoutUnreachable as e:
            _give_up(sent)
            raise ChainBroken(str(e), k, link=False, unsent=range(k + 1)) from e
    replies = []
    try:
        for k, hop in enumerate(hops):
            try:
                # The first hop had its input with its request: silence there is its own.
                replies.append(await hop.answer(sent[k], lose_on_timeout=k == 0))
            except asyncio.TimeoutError:
                raise ChainBroken(f"no answer from {hop.peer_id} within {hop.timeout:.0f} s of the hop before it", k, link=True) from None
            except ChainBroken:
                raise
            except ScoutUnreachable as e:
                raise ChainBroken(str(e), k, link=False) from e
            except ScoutError as e:
                if e.code in AFTER and k + 1 < n:
                    raise ChainBroken(str(e), k + 1, link=True) from e
                if e.code in BEFORE and k > 0:
                    raise ChainBroken(str(e), k, link=True) from e
                raise
    finally:
        _give_up(sent)
    outputs: list[torch.Tensor | None] = []
    for k, (hop, (reply, body)) in enumerate(zip(hops, replies)):
        if (body or k == n - 1) and hashlib.sha256(body).hexdigest() != reply.output_sha256:
            raise ChainBroken(f"{hop.peer_id} sent an output other than the one it signed", k, link=False)
        if k and reply.input_sha256 != replies[k - 1][0].output_sha256:
            raise ChainBroken(f"{hop.peer_id} received other hidden states than {hops[k - 1].peer_id} says it sent", k, link=True)
        outputs.append(tensor_from_bytes(body, reply.dtype, reply.shape) if body or k == n - 1 else None)
    for k, (hop, (reply, body)) in enumerate(zip(hops, replies)):
        hop.record_forward(reply, reply.output_sha256, len(x), len(payload) if k == 0 else 0, len(body), timed=False)
    if stats is not None:
        stats.passes += 1
        stats.hops += n
        stats.overhead_ms += (time.perf_counter() - started) * 1000 - sum(reply.compute_ms for reply, _ in replies)
    return outputs


def _give_up(sent: list) -> None:
    """Replies still to come to a chain that is over go unread."""
    for s in sent:
        if s is not None and not s.answer.done():
            s.answer.cancel()
