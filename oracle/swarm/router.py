"""Choosing the chain of hops a session runs through: pure functions over plain data.

Nodes are block indices 0..n_layers; every usable hop (a Scout connection, or the Oracle's own
blocks) is an edge from its span's start to its end, weighted by its expected step time. Like
Petals' routing, the weight combines measured round-trip time with how loaded the hop is; the
Oracle's own blocks are a last resort. Running a step over the chosen route is runner.py's job.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence


class NoRoute(LookupError):
    pass


# A hop nobody has measured yet is assumed this slow; the Oracle's own blocks are a last resort.
UNMEASURED_MS = 5.0
LOCAL_HOP_COST = 1e6
SESSIONS_PER_DOUBLING = 8  # a hop carrying this many sessions counts as twice as slow


@dataclass(frozen=True)
class RouteOption:
    """What the router knows of one hop."""

    span: tuple[int, int]
    latency_ms: float | None = None  # measured forward round trip (None: not yet)
    sessions: int = 0  # sessions routed through it now
    local: bool = False  # the Oracle's own blocks


def hop_cost(option: RouteOption) -> float:
    if option.local:
        return LOCAL_HOP_COST
    return (option.latency_ms or UNMEASURED_MS) * (1 + option.sessions / SESSIONS_PER_DOUBLING)


def choose_route(options: Sequence[RouteOption], start: int, end: int) -> list[int]:
    """Indices into ``options`` of the hops covering blocks [start, end) back to back with the
    least total cost (ties: the earlier option)."""
    by_start: dict[int, list[int]] = {}
    for i, o in enumerate(options):
        s, e = o.span
        if start <= s < e <= end:
            by_start.setdefault(s, []).append(i)
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, int]] = {}  # boundary → (previous boundary, option index)
    queue = [(0.0, start)]
    while queue:
        dist, node = heapq.heappop(queue)
        if node == end:
            break
        if dist > best.get(node, float("inf")):
            continue
        for i in by_start.get(node, []):
            nxt = options[i].span[1]
            d = dist + hop_cost(options[i])
            if d < best.get(nxt, float("inf")):
                best[nxt] = d
                came_from[nxt] = (node, i)
                heapq.heappush(queue, (d, nxt))
    if end not in best:
        reachable = max(best)
        served = sorted({o.span for o in options})
        raise NoRoute(f"no Scout serves block {reachable}; the Scouts serve {served} of blocks [{start}, {end})")
    path, node = [], end
    while node != start:
        node, i = came_from[node]
        path.append(i)
    return path[::-1]


def uncovered(spans: Sequence[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The stretches of [start, end) no span covers (where the Oracle's own blocks may fill in)."""
    covered = [False] * end
    for s, e in spans:
        for b in range(max(s, start), min(e, end)):
            covered[b] = True
    out, b = [], start
    while b < end:
        if covered[b]:
            b += 1
            continue
        e = b
        while e < end and not covered[e]:
            e += 1
        out.append((b, e))
        b = e
    return out
