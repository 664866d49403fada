"""The chain of hops a session runs through: a shortest path over block boundaries.

Nodes are block indices 0..n_layers; every live hop (a Scout connection, or the Oracle's own
blocks) is an edge from its span's start to its end, weighted by its expected step time. Like
Petals' routing, the weight combines measured round-trip time with how loaded the hop is.
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence, TypeVar

Hop = TypeVar("Hop")


class NoRoute(LookupError):
    pass


def shortest_path(hops: Sequence[Hop], start: int, end: int, cost: Callable[[Hop], float],
                  span: Callable[[Hop], tuple[int, int]]) -> list[Hop]:
    """Hops covering blocks [start, end) back to back with the least total cost."""
    by_start: dict[int, list[int]] = {}
    for i, h in enumerate(hops):
        s, e = span(h)
        if start <= s < e <= end:
            by_start.setdefault(s, []).append(i)
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, int]] = {}  # boundary → (previous boundary, hop index)
    queue = [(0.0, start)]
    while queue:
        dist, node = heapq.heappop(queue)
        if node == end:
            break
        if dist > best.get(node, float("inf")):
            continue
        for i in by_start.get(node, []):
            nxt = span(hops[i])[1]
            d = dist + cost(hops[i])
            if d < best.get(nxt, float("inf")):
                best[nxt] = d
                came_from[nxt] = (node, i)
                heapq.heappush(queue, (d, nxt))
    if end not in best:
        reachable = max(best)
        served = sorted({span(h) for h in hops})
        raise NoRoute(f"no Scout serves block {reachable}; the Scouts serve {served} of blocks [{start}, {end})")
    path, node = [], end
    while node != start:
        node, i = came_from[node]
        path.append(hops[i])
    return path[::-1]
