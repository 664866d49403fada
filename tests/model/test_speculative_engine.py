"""Speculative decoding with the real model: greedy output as without speculation, sampled output
with the same distribution, and caches after a rejected draft as if it had never been sent."""

from __future__ import annotations

import torch

from oracle.engine.engine import Engine
from oracle.engine.pipeline import LocalPipeline
from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence
from oracle.engine.speculative import Draft
from oracle.swarm.runner import SwarmPipeline
from oracle.trust.health import PeerHealth
from shard_common.model.span import Span, SpanRequest

from ..unit.test_speculative import chi_square_p
from .test_routed_pipeline import Hop

PROMPTS = [
    "Summarize: The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran away into the forest.",
    "Repeat this sentence exactly: Shard splits a model across volunteer machines.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "List the numbers from 1 to 20 separated by commas.",
]
# A verification pass computes k + 1 positions at once, a plain step one: their last bits differ,
# which can flip a token whose top two logprobs are (near-)tied. Outputs may differ only there.
TIE_EPSILON = 0.15


def run(engine, tokenizer, prompts, max_tokens=40, **params):
    seqs = [Sequence(tokenizer.encode_chat([{"role": "user", "content": p}]),
                     SamplingParams(max_tokens=max_tokens, logprobs=True, top_logprobs=2, **params), tokenizer,
                     engine.context_length) for p in prompts]
    list(engine.generate(seqs))
    return seqs


def assert_same_or_tied(plain: Sequence, spec: Sequence) -> bool:
    """True when identical; else the first difference must sit on a near-tie in both runs."""
    for a, b in zip(plain.output, spec.output):
        if a.token != b.token:
            for choice in (a, b):
                (_, first), (_, second) = choice.top
                assert first - second <= TIE_EPSILON, f"differs at a clear choice: {a.top} vs {b.top}"
            return False
    assert len(plain.output) == len(spec.output)
    return True


def test_greedy_speculation_matches_plain_decoding(engine, tokenizer, quant_parts):
    _, span, ends = quant_parts
    plain = run(engine, tokenizer, PROMPTS, temperature=0)
    spec_engine = Engine(ends, LocalPipeline(span), tokenizer, speculative="ngram")
    spec = run(spec_engine, tokenizer, PROMPTS, temperature=0)
    identical = [assert_same_or_tied(a, b) for a, b in zip(plain, spec)]
    assert sum(identical) >= len(PROMPTS) - 1
    stats = spec_engine.speculation.as_dict()
    assert stats["passes"] > 0 and stats["accepted"] > 0 and stats["tokens_per_pass"] > 1.2
    assert span.kv.sessions == {}


def test_greedy_speculation_survives_a_failover(weights, tokenizer, quant_parts):
    runtime, span, ends = quant_parts
    expected = run(Engine(ends, LocalPipeline(span), tokenizer, speculative="ngram"), tokenizer, PROMPTS[:2], temperature=0)
    hops = [Hop(weights, runtime, 0, 12, "first"), Hop(weights, runtime, 12, 30, "doomed", dies_after=5),
            Hop(weights, runtime, 12, 30, "replica")]
    pipeline = SwarmPipeline(lambda: hops, 30, None, PeerHealth())
    routed = run(Engine(ends, pipeline, tokenizer, speculative="ngram"), tokenizer, PROMPTS[:2], temperature=0)
    assert pipeline.failovers == 1
    for a, b in zip(expected, routed):
        assert_same_or_tied(a, b)


def test_rollback_leaves_no_trace_of_rejected_drafts(weights, quant_parts):
    """Two sessions get the same accepted prefix after different rejected drafts: every later
    step computes bit-identical hidden states, on every span of a split model."""
    runtime, _, ends = quant_parts
    spans = [Span(weights, 0, 12, runtime), Span(weights, 12, 30, runtime)]
    prompt, accepted, next_token = [1, 504, 3458, 282, 4649, 30], [314, 1345], 2840
    outputs = []
    for session, rejected in [("a", [77, 9001, 12]), ("b", [40000, 5, 6])]:
        x = ends.embed(prompt)
        for sp in spans:
            x = sp.forward(x, [SpanRequest(session, 0, len(prompt))])
        x = ends.embed(accepted + rejected)
        for sp in spans:
            x = sp.forward(x, [SpanRequest(session, len(prompt), len(accepted) + len(rejected))])
            sp.rollback(session, len(prompt) + len(accepted))
            assert sp.kv.length(session) == len(prompt) + len(accepted)
        x = ends.embed([next_token])
        for sp in spans:
            x = sp.forward(x, [SpanRequest(session, len(prompt) + len(accepted), 1)])
        outputs.append(x)
    assert torch.equal(outputs[0], outputs[1])


class GreedySelfDrafter:
    """Drafts with the model itself, greedily (q is one-hot): at temperature 1 its drafts are
    accepted often but far from always, so both branches of rejection sampling run."""

    name = "test"
    available = True

    def __init__(self, ends, span):
        self.ends, self.span = ends, span

    def release(self, session):
        pass

    def propose(self, session, tokens, k, params):
        session, draft = "~draft", []
        out = self.span.forward(self.ends.embed(tokens), [SpanRequest(session, 0, len(tokens))])
        for i in range(k):
            draft.append(int(self.ends.logits(out[-1:]).argmax()))
            if i < k - 1:
                out = self.span.forward(self.ends.embed(draft[-1:]), [SpanRequest(session, len(tokens) + i, 1)])
        self.span.free(session)
        return Draft(draft)


def test_sampled_speculation_keeps_the_token_distribution(tokenizer, quant_parts):
    """The first three sampled tokens of a short prompt (the second and third drafted), 300 seeds
    with and without speculation: two-sample chi-square per position, significance 0.001."""
    _, span, ends = quant_parts
    plain = Engine(ends, LocalPipeline(span), tokenizer, speculative="off")
    spec = Engine(ends, LocalPipeline(span), tokenizer, speculative="ngram", drafters={"ngram": GreedySelfDrafter(ends, span)})
    ids = tokenizer.encode("The weather today is")
    counts = {}
    for name, engine in [("plain", plain), ("spec", spec)]:
        seqs = [Sequence(ids, SamplingParams(max_tokens=4, temperature=1.0, seed=seed), tokenizer, engine.context_length)
                for seed in range(300)]
        for batch in range(0, 300, 50):
            list(engine.generate(seqs[batch:batch + 50]))
        counts[name] = [[s.output[i].token for s in seqs if len(s.output) > i] for i in (0, 1, 2)]
    stats = spec.speculation
    assert stats.passes >= 250 and 0.1 * stats.drafted < stats.accepted < 0.9 * stats.drafted
    for position in (0, 1, 2):
        a, b = counts["plain"][position], counts["spec"][position]
        vocab = sorted(set(a) | set(b))
        index = {t: i for i, t in enumerate(vocab)}
        ca, cb = torch.zeros(len(vocab)), torch.zeros(len(vocab))
        for t in a:
            ca[index[t]] += 1
        for t in b:
            cb[index[t]] += 1
        # Two-sample test: both against the pooled distribution.
        pooled = (ca + cb) / (ca.sum() + cb.sum())
        assert chi_square_p(cb, pooled) > 0.001 and chi_square_p(ca, pooled) > 0.001, (position, ca, cb)
