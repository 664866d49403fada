"""Which blocks each Scout serves.

Petals' idea, made to fit a pipeline of whole spans: a Scout that joins fills the first run of
uncovered blocks (so spans stay back to back and chains can be formed); once every block is
covered, it replicates the span with the least throughput behind it (strengthening the weakest
part of the chain). When a Scout leaves a hole, a Scout whose blocks are all served by others too
moves into the hole. Scouts keep the span they already serve whenever it still fits, so an
Oracle that restarts adopts the swarm as it finds it, and running sessions are left alone; idle
Scouts on a span replicated twice more than the weakest one move to it.
"""

from __future__ import annotations

from dataclasses import dataclass

Span = tuple[int, int]


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    max_blocks: int  # what its memory holds
    throughput: float = 1.0  # block-tokens per second (relative weights are what matter)
    serving: Span | None = None  # what it already serves (after an Oracle restart, say)
    busy: bool = False  # carries sessions right now: move it only if nothing else can fill a hole


def coverage(spans: list[Span], n_layers: int) -> list[int]:
    counts = [0] * n_layers
    for start, end in spans:
        for b in range(start, end):
            counts[b] += 1
    return counts


def first_gap(spans: list[Span], n_layers: int) -> Span | None:
    counts = coverage(spans, n_layers)
    if 0 not in counts:
        return None
    start = counts.index(0)
    end = start
    while end < n_layers and counts[end] == 0:
        end += 1
    return start, end


def _span_strength(span: Span, assigned: dict[str, Span], by_id: dict[str, Candidate]) -> float:
    return sum(by_id[p].throughput / max(1, s[1] - s[0]) for p, s in assigned.items() if s == span and p in by_id)


def choose_span(n_layers: int, length: int, assigned: dict[str, Span], by_id: dict[str, Candidate]) -> Span:
    """The span a Scout able to hold ``length`` blocks should take, given the current assignment."""
    gap = first_gap(list(assigned.values()), n_layers)
    if gap is not None:
        # The gap's start is right after some span's end (or 0) and, if the gap is filled whole,
        # its end is some span's start: the new span abuts its neighbours.
        return gap[0], min(gap[1], gap[0] + length)
    spans = sorted(set(assigned.values()))
    fitting = [s for s in spans if s[1] - s[0] <= length] or spans
    weakest = min(fitting, key=lambda s: (_span_strength(s, assigned, by_id), s))
    return weakest if weakest[1] - weakest[0] <= length else (weakest[0], weakest[0] + length)


def _valid(span: Span | None, n_layers: int, max_blocks: int) -> bool:
    return span is not None and 0 <= span[0] < span[1] <= n_layers and span[1] - span[0] <= max_blocks


def plan(n_layers: int, candidates: list[Candidate], current: dict[str, Span], span_limit: int = 0) -> dict[str, Span]:
    """The new assignment (peer id → span) for the live ``candidates``, given the ``current`` one
    (which may still name Scouts that just died: their blocks are the ones to heal).

    ``span_limit`` caps every span's length (0: only memory limits it)."""
    by_id = {c.peer_id: c for c in candidates}

    def length_of(c: Candidate) -> int:
        return max(1, min(c.max_blocks, span_limit or n_layers, n_layers))

    assigned: dict[str, Span] = {}
    for c in candidates:
        span = current.get(c.peer_id) or c.serving
        # What a Scout already serves stays even past ``span_limit``: moving it would cost a reload.
        if _valid(span, n_layers, c.max_blocks):
            assigned[c.peer_id] = span
    newcomers = sorted((c for c in candidates if c.peer_id not in assigned), key=lambda c: (-c.throughput, c.peer_id))
    for c in newcomers:
        assigned[c.peer_id] = choose_span(n_layers, length_of(c), assigned, by_id)
    # Holes left by Scouts that went away: move a redundant Scout in (an idle one first).
    while (gap := first_gap(list(assigned.values()), n_layers)) is not None:
        counts = coverage(list(assigned.values()), n_layers)
        redundant = [by_id[p] for p, (s, e) in assigned.items() if all(counts[b] >= 2 for b in range(s, e))]
        if not redundant:
            break
        mover = min(redundant, key=lambda c: (c.busy, c.throughput, c.peer_id))
        assigned[mover.peer_id] = gap[0], min(gap[1], gap[0] + length_of(mover))
    gone = [span for peer, span in current.items() if peer not in by_id]
    _extend_over_holes(n_layers, assigned, by_id, coverage(gone, n_layers))
    _rebalance(n_layers, assigned, by_id, length_of)
    return assigned


def _extend_over_holes(n_layers: int, assigned: dict[str, Span], by_id: dict[str, Candidate], lost: list[int]) -> None:
    """Holes no spare Scout can fill, where the last Scout of some blocks just went away (``lost``
    counts, per block, the Scouts in the current assignment that are gone): a neighbour whose
    memory holds more extends its span over the hole, past ``span_limit`` if need be — a swarm
    that covers every block beats an even split. (A hole nobody served yet is left to Scouts that
    join: a swarm starting up keeps its even split.) Each step covers at least one more block."""
    for _ in range(n_layers):
        counts = coverage(list(assigned.values()), n_layers)
        holes = [b for b in range(n_layers) if counts[b] == 0 and lost[b]]
        if not holes:
            return
        start = end = holes[0]
        while end < n_layers and counts[end] == 0:
            end += 1
        while start > 0 and counts[start - 1] == 0:
            start -= 1
        options = []
        for peer, (s, e) in assigned.items():
            room = by_id[peer].max_blocks - (e - s)
            if room <= 0:
                continue
            if e == start:  # the hole is right after it
                options.append((peer, (s, min(end, e + room))))
            elif s == end:  # right before it
                options.append((peer, (max(start, s - room), e)))
        if not options:
            return
        # Cover as much of the hole as possible; among equals, the fastest Scout.
        peer, span = max(options, key=lambda o: (min(o[1][1], end) - max(o[1][0], start), by_id[o[0]].throughput, o[0]))
        assigned[peer] = span


def _rebalance(n_layers: int, assigned: dict[str, Span], by_id: dict[str, Candidate], length_of) -> None:
    """Lopsided replication (an Oracle restart adopts spans as it finds them; deaths and returns
    pile replicas up on one span): while some idle Scout's blocks are all served at least twice
    more than the least-served block, move it there. Only idle Scouts move: a rebalance must not
    cost a running session its replay. Each move raises the minimum or shrinks the surplus, so
    this ends; the bound is a guard."""
    for _ in range(len(assigned)):
        counts = coverage(list(assigned.values()), n_layers)
        low = min(counts)
        movable = [by_id[p] for p, (s, e) in assigned.items() if not by_id[p].busy and min(counts[s:e]) >= low + 2]
        if not movable:
            return
        mover = min(movable, key=lambda c: (c.throughput, c.peer_id))
        weakest = counts.index(low)
        # Join a span that covers the weakest block (one exists: holes were filled above, and the
        # mover's own blocks are all stronger), so the new replica abuts its neighbours.
        target = min((s for s in assigned.values() if s[0] <= weakest < s[1]), key=lambda s: (s[1] - s[0] > length_of(mover), s))
        assigned[mover.peer_id] = target[0], min(target[1], target[0] + length_of(mover))
