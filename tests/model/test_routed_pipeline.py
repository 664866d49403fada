"""The routed pipeline with the Oracle's own blocks as hops: sessions spread over replicas, and a
hop that fails mid-generation is replaced and replayed without changing a single token."""

from __future__ import annotations

from oracle.engine.engine import Engine
from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence
from oracle.swarm.remote import LocalHop, RemotePipeline, ScoutAddress, ScoutUnreachable
from shard_common.model.span import Span

PROMPTS = ["Write a short poem about the sea.", "Name three colors.", "What is the capital of France?"]


class Hop(LocalHop):
    """Blocks computed in this process, with a name and a way to die after some forwards."""

    def __init__(self, weights, runtime, start, end, name, dies_after=None):
        super().__init__(Span(weights, start, end, runtime))
        self.address = ScoutAddress(name, "-", 0)
        self.dies_after = dies_after
        self.forwards = 0
        self.dead = False

    def forward(self, hidden, requests, dtype="float32"):
        self.forwards += 1
        if self.dies_after is not None and self.forwards > self.dies_after:
            self.dead = True
        if self.dead:
            raise ScoutUnreachable(f"{self.address.peer_id} is gone")
        return super().forward(hidden, requests)


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
    pipeline = RemotePipeline(lambda: [first, doomed, replica], 30, loop=None)
    routed = Engine(ends, pipeline, tokenizer)
    assert generate(routed, tokenizer, PROMPTS) == expected
    assert pipeline.failovers == 1 and replica.forwards > 0
    assert pipeline.routes == {} and pipeline.stale == set()  # finished sessions leave nothing behind
    assert replica.local.kv.sessions == {} and first.local.kv.sessions == {}


def test_a_span_split_differently_on_the_replacement_still_gives_identical_tokens(weights, tokenizer, quant_parts, engine):
    """The dead hop's blocks are re-covered by two hops with another boundary."""
    runtime, _, ends = quant_parts
    expected = generate(engine, tokenizer, PROMPTS[:1])
    hops = [Hop(weights, runtime, 0, 30, "whole", dies_after=4), Hop(weights, runtime, 0, 9, "a"), Hop(weights, runtime, 9, 30, "b")]
    pipeline = RemotePipeline(lambda: hops, 30, loop=None)
    assert generate(Engine(ends, pipeline, tokenizer), tokenizer, PROMPTS[:1]) == expected
    assert hops[1].forwards > 0 and hops[2].forwards > 0
