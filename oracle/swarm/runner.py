"""Running the engine's steps over the swarm: the engine's Pipeline, hop by hop through each
session's route. Called on the engine's thread; network work runs on the event loop (``loop``)
that owns the connections.

- Routes: a session gets its chain of hops when it starts, chosen by router.py over the hops
  ``PeerHealth`` calls usable; a batched step groups its sessions by route.
- Failover: when a hop fails (or may no longer be used: quarantined, failed a check of its output),
  every session routed through it gets a replacement for that hop's blocks (a replica, a Scout
  that took the blocks over, or the Oracle's own blocks with ``fill``), and its caches there are
  rebuilt from history.py before its next step. With no replacement yet, the step waits up to
  ``reroute_seconds`` for one (a Scout taking the blocks over). The client sees a pause.
- Pipelining: the engine's steps are resumables (shard_common/main_thread.py) that give the
  engine's thread up while a Scout computes; the scheduler keeps ``depth()`` micro-batches in
  flight, so different Scouts compute different micro-batches at once.
- Fewer round trips: rollbacks (rejected drafts), forks and frees wait for the hop's next
  forward and ride on it; a hop left with no session gets its pending operations at once.
- Chains (chain.py): where consecutive Scouts can relay to each other, a step goes Oracle → S1 →
  … → Sn → Oracle (n + 1 trips instead of 2n). A chain that breaks is unwound (the hops that
  computed roll the step back, riding on their next forward) and the step goes on from the
  chain's first hop: around a failed hop, or by hub across a link that could not relay.
- Audits: every Scout forward goes past the trust package's traffic audit, which checks the
  sessions it follows (and suspicious outputs) before the output is used, computing its side
  while the Scout computes; the ticket auditor hears of every forward (golden tickets follow some).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import time
from typing import Callable

import torch

from oracle.trust.health import PeerHealth
from oracle.trust.tickets import Auditor
from oracle.trust.traffic import TrafficAudit
from shard_common.main_thread import Resumable, Waiting, drive, start_on_loop
from shard_common.model.span import SpanRequest
from shard_common.protocol import CacheOp

from .chain import ChainBreaks, ChainBroken, ChainStats, Link, chain_length, run_chain
from .connection import ScoutUnreachable
from .history import SessionHistory
from .local_hop import LocalFactory, LocalHop
from .router import NoRoute, RouteOption, choose_route, uncovered

log = logging.getLogger(__name__)


class SwarmPipeline:
    def __init__(self, hops: Callable[[], list], n_layers: int, loop: asyncio.AbstractEventLoop | None,
                 health: PeerHealth, wire_dtype: str = "float32", fill: LocalFactory | None = None,
                 reroute_seconds: float = 20.0, auditor: Auditor | None = None, traffic: TrafficAudit | None = None,
                 piggyback: bool = True, depth: int = 0, chain: bool = True):
        self.hops = hops  # the hops that serve spans now (Scout connections)
        self.n_layers = n_layers
        self.loop = loop
        self.health = health
        self.wire_dtype = wire_dtype
        self.fill = fill
        self.reroute_seconds = reroute_seconds
        self.auditor = auditor
        self.traffic = traffic
        self.piggyback = piggyback  # False: every cache operation costs its own round trip (benchmarks)
        self.fixed_depth = depth  # micro-batches in flight; 0: from the route's length
        self.chain = chain  # False: every hop the hub way (benchmarks, or Scouts that must not talk to each other)
        self.breaks = ChainBreaks()
        self.chains = ChainStats()
        self.routes: dict[str, list] = {}
        self.history = SessionHistory()
        self.stale: set[tuple[str, object]] = set()  # (session, hop) whose cache there must be rebuilt
        self.pending: dict[object, list[CacheOp]] = {}  # cache operations waiting for the hop's next forward
        self.local_hops: dict[tuple[int, int], LocalHop] = {}
        self.failovers = 0
        self.stopping = threading.Event()  # set by the swarm's close(): no more waiting for routes
        self.passes = 0  # forward passes through the whole route
        self.round_trips = 0  # data-plane requests to Scouts made for those passes (replays included)

    def _calling(self, hop, method: str, *args) -> Resumable:
        """A Scout's request runs on the event loop that owns its connection; a LocalHop's right here."""
        result = getattr(hop, method)(*args)
        if not inspect.iscoroutine(result):
            return result
        self.round_trips += 1
        return (yield Waiting(self.loop, start_on_loop(self.loop, result)))

    def _call(self, hop, method: str, *args):
        return drive(self._calling(hop, method, *args))

    # ---- routes ---------------------------------------------------------------------------------

    def load(self) -> dict[object, int]:
        counts: dict[object, int] = {}
        for route in self.routes.values():
            for hop in route:
                counts[hop] = counts.get(hop, 0) + 1
        return counts

    def _candidates(self, start: int, end: int) -> list:
        live = [h for h in self.hops() if not h.dead and self.health.usable(h.peer_id)]
        if self.fill is not None:
            for gap in uncovered([h.span for h in live], start, end):
                if gap not in self.local_hops:
                    self.local_hops[gap] = self.fill(*gap)
                live.append(self.local_hops[gap])
        return live

    def path(self, start: int = 0, end: int | None = None) -> list:
        """The cheapest usable hops covering blocks [start, end) now."""
        end = self.n_layers if end is None else end
        load = self.load()
        hops = self._candidates(start, end)
        options = [RouteOption(h.span, h.latency_ms, load.get(h, 0), h.local) for h in hops]
        try:
            return [hops[i] for i in choose_route(options, start, end)]
        except NoRoute as e:
            raise ScoutUnreachable(f"no route through the swarm: {e}") from None

    def _wait_for_path(self, start: int, end: int, why: str) -> list:
        """A path over blocks [start, end), waiting up to ``reroute_seconds`` for one to appear
        (a replica finishing its load, a Scout taking over the blocks, a restarted Scout)."""
        deadline = time.monotonic() + self.reroute_seconds
        while True:
            try:
                return self.path(start, end)
            except ScoutUnreachable as e:
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise ScoutUnreachable(f"{e} ({why}; waited {self.reroute_seconds:.0f} s)") from None
                time.sleep(0.25)

    def _route_of(self, r: SpanRequest) -> list:
        route = self.routes.get(r.session)
        if route is None:
            route = self.routes[r.session] = self._wait_for_path(0, self.n_layers, "a new session")
            if r.start > 0:  # a session we lost track of: rebuild it everywhere from its history
                self.stale.update((r.session, hop) for hop in route)
        return route

    def _repair(self, route: list, i: int, why: str) -> list:
        """A new route for one whose hop ``i`` failed.

        The failed hop's blocks alone are replaced when some usable hops cover exactly them (a
        replica, two Scouts with another boundary); otherwise the window widens over its
        neighbours — a survivor that extended its span over the hole covers more than the dead
        hop did. Waits up to ``reroute_seconds`` for either (a Scout taking the blocks over)."""
        deadline = time.monotonic() + self.reroute_seconds
        windows = sorted(((j, k) for j in range(i + 1) for k in range(i, len(route))), key=lambda w: (w[1] - w[0], w))
        while True:
            for j, k in windows:
                try:
                    return route[:j] + self.path(route[j].span[0], route[k].span[1]) + route[k + 1:]
                except ScoutUnreachable as e:
                    problem = e
            if time.monotonic() > deadline or self.stopping.is_set():
                raise ScoutUnreachable(f"{problem} ({why}; waited {self.reroute_seconds:.0f} s)") from None
            time.sleep(0.25)

    def _reroute(self, failed) -> None:
        """Give every session routed through ``failed`` a working route."""
        repaired: dict[tuple, list] = {}
        moved = [session for session, route in self.routes.items() if failed in route]
        dropped: dict[object, list[str]] = {}  # hops left behind, with the sessions whose caches there go
        for session in moved:
            old = self.routes[session]
            if tuple(old) not in repaired:
                repaired[tuple(old)] = self._repair(old, old.index(failed), f"no Scout left after {failed.peer_id} failed")
            new = repaired[tuple(old)]
            self.routes[session] = list(new)
            self.stale.update((session, hop) for hop in new if hop not in old)
            for hop in old:
                if hop not in new and hop is not failed:
                    dropped.setdefault(hop, []).append(session)
        self.stale = {(s, h) for s, h in self.stale if h is not failed and (h not in dropped or s not in dropped[h])}
        self.pending.pop(failed, None)
        if not failed.dead:  # alive but unusable (quarantined): its caches of the moved sessions go
            dropped[failed] = moved
        for hop, sessions in dropped.items():
            if not hop.dead:
                self.pending.setdefault(hop, []).extend(CacheOp(op="close", session=s) for s in sessions)
        self._flush_if_idle(list(dropped))
        self.failovers += 1
        for old, new in repaired.items():
            log.warning("%s failed: route %s became %s; %d sessions will be replayed where they are new", failed.peer_id,
                        " → ".join(h.peer_id for h in old), " → ".join(h.peer_id for h in new), len(moved))

    # ---- the Pipeline protocol ------------------------------------------------------------------

    def depth(self) -> int:
        """One micro-batch per Scout on a route, and one more for the Oracle's own part of a step
        (embedding, head, sampling): then every stage has work while the others compute."""
        if self.fixed_depth:
            return self.fixed_depth
        # Asked on the event loop: plain reads of the hops, none of the engine thread's state.
        live = [h for h in self.hops() if not h.dead and self.health.usable(h.peer_id)]
        try:
            return len(choose_route([RouteOption(h.span, h.latency_ms) for h in live], 0, self.n_layers)) + 1
        except NoRoute:
            return 1  # the Oracle's own blocks (--fallback-local) leave nothing to overlap

    def resumable_forward(self, hidden: torch.Tensor, requests: list[SpanRequest]) -> Resumable[torch.Tensor]:
        """The route's output for ``hidden``, giving the thread up wherever it waits on a Scout:
        the scheduler keeps several micro-batches in flight, each a resumable forward."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(tuple(self._route_of(r)), []).append(i)
        offsets = list(itertools.accumulate((r.n_tokens for r in requests), initial=0))
        # A prompt read in this step: material for golden tickets (real hidden states).
        prompt = next((hidden[offsets[i]:offsets[i + 1]] for i, r in enumerate(requests) if r.start == 0 and r.n_tokens > 1), None)
        if len(groups) == 1:
            out = (yield from self._run_group(hidden, requests, prompt)).float().cpu()
        else:
            out = torch.empty(hidden.shape, dtype=torch.float32)
            for indices in groups.values():
                rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in indices])
                out[rows] = (yield from self._run_group(hidden[rows], [requests[i] for i in indices], prompt)).float().cpu()
        for r, offset in zip(requests, offsets):
            self.history.record(r, hidden[offset:offset + r.n_tokens])
        self.passes += 1
        return out

    def _run_group(self, x: torch.Tensor, requests: list[SpanRequest], prompt: torch.Tensor | None = None) -> Resumable[torch.Tensor]:
        """Sessions sharing one route, hop by hop (or a chain of hops at a time); a failed (or no
        longer usable) hop is replaced and the step goes on from the first hop that changed.
        Another micro-batch in flight may repair the route meanwhile (a hop they share failed for
        it): the step then goes on from the first hop the repair changed, or from the start of
        the chain that hop was in (the chain's hops computed the step: they roll it back)."""
        session = requests[0].session
        route = list(self.routes[session])
        i, inputs = 0, [x]  # inputs[i]: what hop i of the route receives in this step (None: inside a chain)
        while i < len(route):
            if self.routes[session] != route:
                common = min(i, _common_prefix(route, self.routes[session]))
                back = max(j for j in range(common + 1) if inputs[j] is not None)
                self._unwind(route[back:common], requests)
                i, route = back, list(self.routes[session])
                inputs, x = inputs[:i + 1], inputs[i]
                continue
            hop = route[i]
            try:
                if not hop.local and not self.health.usable(hop.peer_id):
                    raise ScoutUnreachable(f"Scout {hop.peer_id} may not carry traffic now ({self.health.trust(hop.peer_id)})")
                for r in requests:
                    if (r.session, hop) in self.stale:
                        yield from self._replay(r, i)
                n = self._chain_length(route[i:], requests)
                if n > 1:
                    out = yield from self._chained(route[i:i + n], x, requests)
                elif hop.local or self.traffic is None:
                    out = yield from self._calling(hop, "forward", x, requests, self.wire_dtype, self.pending.pop(hop, []))
                else:
                    out = yield from self._audited_forward(hop, x, requests)
                for h in route[i:i + n]:
                    if not h.local and self.auditor is not None:
                        self.auditor.observe(h, prompt)
                x = out
                i += n
                inputs += [None] * (n - 1) + [x]
            except ChainBroken as e:
                log.warning("chain %s broke at hop %d: %s", " → ".join(h.peer_id for h in route[i:i + n]), e.at, e)
                self.chains.fallbacks += 1
                self._unwind(route[i:i + n], requests)
                if e.link:
                    self.breaks.record(route[i + e.at - 1].peer_id, route[i + e.at].peer_id)
                elif route[i + e.at] in self.routes[session]:
                    self._reroute(route[i + e.at])
            except ScoutUnreachable as e:
                failed = e.hop if isinstance(e, HopFailed) else hop
                log.warning("hop %d: %s", route.index(failed), e)
                if failed in self.routes[session]:  # else another micro-batch has repaired the route already
                    self._reroute(failed)
        return x

    def _chain_length(self, hops: list, requests: list[SpanRequest]) -> int:
        """How many of ``hops`` (the rest of a route) this step may travel through as a chain."""
        if not self.chain or len(hops) < 2:
            return 1
        links = [Link(hop.peer_id, local=hop.local, dialable=hop.reached == "direct",
                      checked=self.traffic is not None and not hop.local and self.traffic.checks(hop.peer_id, hop.span, requests),
                      stale=any((r.session, hop) in self.stale for r in requests),
                      usable=hop.local or (not hop.dead and self.health.usable(hop.peer_id)))
                 for hop in hops]
        return chain_length(links, self.breaks.broken)

    def _chained(self, hops: list, x: torch.Tensor, requests: list[SpanRequest]) -> Resumable[torch.Tensor]:
        """One step through a chain of Scouts. With audits on, every hop echoes its output, and each
        is reviewed as on the hub path (plausibility, recomputation of a suspicious one, taint)
        before the last hop's output is used."""
        ops = [self.pending.pop(hop, []) for hop in hops]
        self.round_trips += 1
        echo = self.traffic is not None
        try:
            outputs = yield Waiting(self.loop, start_on_loop(self.loop, run_chain(hops, x, requests, self.wire_dtype, ops,
                                                                                  self.chains, echo)))
        except ChainBroken as e:
            for k in e.unsent:  # their operations never left: they ride on the next forward after all
                if ops[k]:
                    self.pending[hops[k]] = ops[k] + self.pending.get(hops[k], [])
            raise
        for a, b in zip(hops, hops[1:]):
            self.breaks.healed(a.peer_id, b.peer_id)
        if echo:
            inputs = [x] + outputs[:-1]
            for k, hop in enumerate(hops):
                if not self.traffic.review(hop.peer_id, hop.span, inputs[k], outputs[k], requests, self.history.replay):
                    raise ChainBroken(f"Scout {hop.peer_id} failed a check of its output", k, link=False)
        return outputs[-1]

    def _unwind(self, hops: list, requests: list[SpanRequest]) -> None:
        """Hops that may have computed this step forget it (before their next forward)."""
        for hop in hops:
            if not hop.dead and not hop.local:
                self.pending.setdefault(hop, []).extend(CacheOp(op="rollback", session=r.session, length=r.start) for r in requests)

    def _audited_forward(self, hop, x: torch.Tensor, requests: list[SpanRequest]) -> Resumable[torch.Tensor]:
        """``hop``'s output for ``x``, once the traffic audit lets it through; the Oracle's side of
        the check runs here while the Scout computes."""
        self.round_trips += 1
        running = start_on_loop(self.loop, hop.forward(x, requests, self.wire_dtype, self.pending.pop(hop, [])))
        plan = self.traffic.expect(hop.peer_id, hop.span, x, requests)
        out = yield Waiting(self.loop, running)
        if not self.traffic.judge(plan, x, out, requests, self.history.replay):
            raise ScoutUnreachable(f"Scout {hop.peer_id} failed a check of its output")
        return out

    def _replay(self, r: SpanRequest, i: int) -> Resumable[None]:
        """Rebuild ``r.session``'s cache on hop ``i`` of its route, chunk by chunk as first fed;
        where drafts were rejected, the rollback rides on the hop's next forward. A replay cut
        short (a hop before ``i`` failed: HopFailed names it) leaves nothing half built behind."""
        route = self.routes[r.session]
        scratch = f"{r.session}~replay"
        try:
            for position, x, keep in self.history.replay(r.session, r.start):
                n = len(x)
                for hop in route[:i]:
                    try:
                        x = yield from self._calling(hop, "forward", x, [SpanRequest(scratch, position, n)], self.wire_dtype,
                                                     self.pending.pop(hop, []))
                    except ScoutUnreachable as e:
                        raise HopFailed(hop, e) from e
                    if keep < n:
                        self.pending.setdefault(hop, []).append(CacheOp(op="rollback", session=scratch, length=position + keep))
                yield from self._calling(route[i], "forward", x, [SpanRequest(r.session, position, n)], self.wire_dtype,
                                         self.pending.pop(route[i], []))
                if keep < n:
                    self.pending.setdefault(route[i], []).append(CacheOp(op="rollback", session=r.session, length=position + keep))
        except ScoutUnreachable:
            if not route[i].dead:  # the next attempt replays from the start
                self.pending.setdefault(route[i], []).append(CacheOp(op="close", session=r.session))
            raise
        finally:
            for hop in route[:i]:
                self.pending.setdefault(hop, []).append(CacheOp(op="close", session=scratch))
        self.stale.discard((r.session, route[i]))

    def _queue(self, session: str, op: CacheOp, also: str | None = None) -> None:
        """A cache operation for ``session`` on every hop of its route, except hops where its cache
        is due to be rebuilt anyway (there ``also`` is marked for rebuilding too)."""
        for hop in list(self.routes.get(session, [])):
            if (session, hop) in self.stale:
                if also is not None:
                    self.stale.add((also, hop))
                continue
            self.pending.setdefault(hop, []).append(op)
            if not self.piggyback:
                self._flush(hop, session, also)

    def _flush(self, hop, session: str | None = None, also: str | None = None) -> None:
        """Send ``hop``'s pending operations now, in a round trip of their own."""
        ops = self.pending.pop(hop, [])
        if not ops:
            return
        try:
            self._call(hop, "cache", ops)
        except ScoutUnreachable as e:
            log.warning("cache operations on %s: %s", hop.peer_id, e)
            if session is not None and session in self.routes and any(o.op != "close" for o in ops):
                self._reroute(hop)
                if also is not None:
                    self.stale.update((also, h) for h in self.routes[session] if (session, h) in self.stale)

    def _flush_if_idle(self, hops: list) -> None:
        """Operations for hops no session runs through would wait forever for a forward."""
        load = self.load()
        for hop in hops:
            if hop not in load and not hop.dead:
                self._flush(hop)

    def rollback(self, session: str, length: int) -> None:
        if self.traffic is not None:
            self.traffic.rollback(session, length)
        self.history.rollback(session, length)
        self._queue(session, CacheOp(op="rollback", session=session, length=length))

    def fork(self, source: str, target: str) -> None:
        if self.traffic is not None:
            self.traffic.fork(source, target)
        self.history.fork(source, target)
        if source in self.routes:
            self.routes[target] = list(self.routes[source])
        self._queue(source, CacheOp(op="fork", session=source, target=target), also=target)

    def free(self, session: str) -> None:
        if self.traffic is not None:
            self.traffic.free(session)
        self.history.free(session)
        route = self.routes.get(session, [])
        self._queue(session, CacheOp(op="close", session=session))
        self.routes.pop(session, None)
        self.stale = {(s, h) for s, h in self.stale if s != session}
        self._flush_if_idle(route)

    def abort(self) -> None:
        """On the event loop, at shutdown: no more waiting for routes, and a forward waiting on a
        Scout that froze fails at once (its connection is cut)."""
        self.stopping.set()
        for hop in self.hops():
            if not hop.local:
                hop.abort()

    def status(self) -> dict:
        return {"passes": self.passes, "round_trips": self.round_trips, "failovers": self.failovers,
                "round_trips_per_pass": round(self.round_trips / self.passes, 3) if self.passes else None,
                "piggyback": self.piggyback,
                "chain": {"enabled": self.chain, **self.chains.status(), **self.breaks.status()}}


class HopFailed(ScoutUnreachable):
    """``hop`` failed while the step was at another hop (replaying a session through the hops before it)."""

    def __init__(self, hop, error: Exception):
        super().__init__(str(error))
        self.hop = hop


def _common_prefix(a: list, b: list) -> int:
    """How many leading hops two routes share."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x is not y), min(len(a), len(b)))
