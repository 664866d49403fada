"""The routed pipeline with the Oracle's own blocks as hops: sessions spread over replicas, and a
hop that fails mid-generation is replaced and replayed without changing a single token."""

from __future__ import annotations

from oracle.engine.engine import Engine
from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence
from oracle.swarm.connection import ScoutUnreachable
from oracle.swarm.local_hop import LocalHop
from oracle.swarm.runner import SwarmPipeline
from oracle.trust.health import PeerHealth
from shard_common.model.span import Span

PROMPTS = ["Write a short poem about the sea.", "Name three colors.", "What is the capital of France?"]


class Hop(LocalHop):
    """Blocks computed in this process, routed like a Scout, with a name and a way to die after
    some forwards."""

    local = False

    def __init__(self, weights, runtime, start, end, name, dies_after=None):
        super().__init__(Span(weights, start, end, runtime), peer_id=name)
        self.dies_after = dies_after
        self.forwards = 0
        self.dead = False
        self.ops_on_forwards: list = []  # cache operations that rode on forwards
        self.cache_calls = 0  # round trips of their own

    def forward(self, hidden, requests, dtype="float32", ops=None):
        self.forwards += 1
        if self.dies_after is not None and self.forwards > self.dies_after:
            self.dead = True
        if self.dead:
            raise ScoutUnreachable(f"{self.peer_id} is gone")
        self.ops_on_forwards += ops or []
        return super().forward(hidden, requests, dtype, ops)

    def cache(self, ops):
        self.cache_calls += 1
        super().cache(ops)


def generate(engine, tokenizer, prompts):
    seqs = [Sequence(tokenizer.encode_chat([{"role": "user", "content": p}]), SamplingParams(max_tokens=24, temperature=0),
                     tokenizer, engine.context_length) for p in prompts]
    list(engine.generate(seqs))
    return [[c.token for c in s.output] for s in seqs]


def test_failover_mid_generation_replays_to_identical_tokens(weights, tokenizer, quant_parts, engine):
    runtime, _, ends = quant_parts
    expected = generate(engine, tokenizer, PROMPTS)
    first = Hop(weights, runtime, 0, 12, "first")
    doomed = Hop(weights, runtime, 12, 30, "doomed", dies_after=6)
    replica = Hop(weights, runtime, 12, 30, "replica")
    # The engine's sessions are routed when they start; the doomed hop is listed first, so ties pick it.
    pipeline = SwarmPipeline(lambda: [first, doomed, replica], 30, None, PeerHealth())
    routed = Engine(ends, pipeline, tokenizer)
    assert generate(routed, tokenizer, PROMPTS) == expected
    assert pipeline.failovers == 1 and replica.forwards > 0
    assert pipeline.routes == {} and pipeline.stale == set() and pipeline.pending == {}  # finished sessions leave nothing behind
    assert replica.local.kv.sessions == {} and first.local.kv.sessions == {}


def test_a_span_split_differently_on_the_replacement_still_gives_identical_tokens(weights, tokenizer, quant_parts, engine):
    """The dead hop's blocks are re-covered by two hops with another boundary."""
    runtime, _, ends = quant_parts
    expected = generate(engine, tokenizer, PROMPTS[:1])
    hops = [Hop(weights, runtime, 0, 30, "whole", dies_after=4), Hop(weights, runtime, 0, 9, "a"), Hop(weights, runtime, 9, 30, "b")]
    pipeline = SwarmPipeline(lambda: hops, 30, None, PeerHealth())
    assert generate(Engine(ends, pipeline, tokenizer), tokenizer, PROMPTS[:1]) == expected
    assert hops[1].forwards > 0 and hops[2].forwards > 0


def test_rollbacks_and_frees_ride_on_the_next_forward(weights, tokenizer, quant_parts):
    """With speculation, every rejected draft rolls every hop back: those rollbacks (and the frees
    of finished sessions) travel with the hop's next forward, not in round trips of their own;
    only a hop left with no session gets its pending frees at once."""
    runtime, span, ends = quant_parts
    prompts = ["List the numbers from 1 to 20 separated by commas.", *PROMPTS]
    runs = {}
    for piggyback in (True, False):
        hops = [Hop(weights, runtime, 0, 12, "a"), Hop(weights, runtime, 12, 30, "b")]
        pipeline = SwarmPipeline(lambda: hops, 30, None, PeerHealth(), piggyback=piggyback)
        engine = Engine(ends, pipeline, tokenizer, speculative="ngram")
        runs[piggyback] = generate(engine, tokenizer, prompts)
        rollbacks = sum(op.op == "rollback" for h in hops for op in h.ops_on_forwards)
        if piggyback:
            assert rollbacks > 0 and all(h.cache_calls == 1 for h in hops), [h.cache_calls for h in hops]  # the last free, when the hops fell idle
        else:
            assert rollbacks == 0 and all(h.cache_calls > len(prompts) for h in hops)
        assert all(h.local.kv.sessions == {} for h in hops) and pipeline.pending == {}
    assert runs[True] == runs[False]


def test_a_hole_covered_by_a_survivor_that_extended_its_span(weights, tokenizer, quant_parts, engine):
    """No replica of the dead hop: a neighbour's wider span (a survivor that took the blocks over)
    replaces both, the step resumes at the first hop that changed, and the tokens stay the same."""
    runtime, _, ends = quant_parts
    expected = generate(engine, tokenizer, PROMPTS[:2])
    a, doomed, c = Hop(weights, runtime, 0, 10, "a"), Hop(weights, runtime, 10, 20, "doomed", dies_after=5), Hop(weights, runtime, 20, 30, "c")
    wider = Hop(weights, runtime, 0, 20, "a-extended")
    pipeline = SwarmPipeline(lambda: [a, doomed, c] + ([wider] if doomed.dead else []), 30, None, PeerHealth())
    assert generate(Engine(ends, pipeline, tokenizer), tokenizer, PROMPTS[:2]) == expected
    assert pipeline.failovers == 1 and wider.forwards > 0
    assert all(h.local.kv.sessions == {} for h in (a, c, wider)) and pipeline.pending == {}  # a's caches were closed


def test_a_hop_failing_while_it_replays_a_session_into_the_next_is_the_one_replaced(weights, tokenizer, quant_parts, engine):
    """b dies; while the session is replayed into b's replica through a, a dies too: a (not the
    replica being rebuilt) is replaced, and the replica's half-built cache is rebuilt from the start."""
    runtime, _, ends = quant_parts
    expected = generate(engine, tokenizer, PROMPTS[:1])
    a, b = Hop(weights, runtime, 0, 12, "a", dies_after=6), Hop(weights, runtime, 12, 30, "b", dies_after=5)
    a2, b2 = Hop(weights, runtime, 0, 12, "a2"), Hop(weights, runtime, 12, 30, "b2")
    pipeline = SwarmPipeline(lambda: [a, b, a2, b2], 30, None, PeerHealth())
    assert generate(Engine(ends, pipeline, tokenizer), tokenizer, PROMPTS[:1]) == expected
    assert pipeline.failovers == 2 and a2.forwards > 0 and b2.forwards > 0
    assert all(h.local.kv.sessions == {} for h in (a2, b2)) and pipeline.pending == {}
