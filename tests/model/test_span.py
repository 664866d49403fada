"""Span execution: splitting, ragged batches, rollback."""

from __future__ import annotations

import itertools

import pytest
import torch

from shard_common.model.kv_cache import KVBudgetExceeded
from shard_common.model.span import Span, SessionOutOfStep, SpanRequest

_sessions = itertools.count()


def new_session():
    return f"t{next(_sessions)}"


def run(spans, hidden, requests):
    for span in spans:
        hidden = span.forward(hidden, requests)
    return hidden


@pytest.fixture(scope="module")
def split_spans(weights, quant_parts):
    runtime = quant_parts[0]
    k = 11
    return Span(weights, 0, k, runtime), Span(weights, k, weights.config.n_layers, runtime)


def test_two_spans_bit_identical_to_whole(quant_parts, split_spans, tokenizer):
    _, whole, ends = quant_parts
    ids = tokenizer.encode("Splitting the model must not change a single bit.")
    a, b = new_session(), new_session()
    h_whole = whole.forward(ends.embed(ids), [SpanRequest(a, 0, len(ids))])
    h_split = run(split_spans, ends.embed(ids), [SpanRequest(b, 0, len(ids))])
    assert torch.equal(h_whole, h_split)
    for step in range(5):
        token = int(ends.logits(h_whole[-1:]).argmax())
        assert token == int(ends.logits(h_split[-1:]).argmax())
        pos = len(ids) + step
        h_whole = whole.forward(ends.embed([token]), [SpanRequest(a, pos, 1)])
        h_split = run(split_spans, ends.embed([token]), [SpanRequest(b, pos, 1)])
        assert torch.equal(h_whole, h_split)
    whole.free(a)
    for s in split_spans:
        s.free(b)


def test_rollback_then_redecode_gives_identical_logits(quant_parts, tokenizer):
    _, span, ends = quant_parts
    ids = tokenizer.encode("Rollback must leave the cache as if nothing happened")
    s = new_session()
    span.forward(ends.embed(ids[:-3]), [SpanRequest(s, 0, len(ids) - 3)])
    first = span.forward(ends.embed(ids[-3:]), [SpanRequest(s, len(ids) - 3, 3)])
    # Send junk that will be rejected, then roll back and re-send the real tokens.
    span.rollback(s, len(ids) - 3)
    span.forward(ends.embed([5, 6, 7, 8]), [SpanRequest(s, len(ids) - 3, 4)])
    span.rollback(s, len(ids) - 3)
    again = span.forward(ends.embed(ids[-3:]), [SpanRequest(s, len(ids) - 3, 3)])
    assert torch.equal(ends.logits(first), ends.logits(again))
    span.free(s)


def test_verify_k_positions_matches_single_steps(quant_parts, tokenizer):
    """One pass over k positions (speculative verification) scores like k one-token steps."""
    _, span, ends = quant_parts
    ids = tokenizer.encode("Counting: one, two, three, four, five, six")
    a, b = new_session(), new_session()
    p = len(ids) - 5
    span.forward(ends.embed(ids[:p]), [SpanRequest(a, 0, p)])
    span.forward(ends.embed(ids[:p]), [SpanRequest(b, 0, p)])
    batched = ends.logits(span.forward(ends.embed(ids[p:]), [SpanRequest(a, p, 5)]))
    single = torch.cat([ends.logits(span.forward(ends.embed([t]), [SpanRequest(b, p + i, 1)])) for i, t in enumerate(ids[p:])])
    assert torch.equal(batched.argmax(-1), single.argmax(-1))
    assert (batched - single).abs().max() < 0.5
    span.free(a)
    span.free(b)


def test_ragged_batch_matches_separate_runs(quant_parts, tokenizer):
    _, span, ends = quant_parts
    prompts = [tokenizer.encode(t) for t in ("Short one.", "A somewhat longer prompt with more words in it.", "Mid length text here")]
    alone = []
    for ids in prompts:
        s = new_session()
        alone.append(ends.logits(span.forward(ends.embed(ids), [SpanRequest(s, 0, len(ids))])[-1:]))
        span.free(s)
    sessions = [new_session() for _ in prompts]
    flat = [t for ids in prompts for t in ids]
    hidden = span.forward(ends.embed(flat), [SpanRequest(s, 0, len(ids)) for s, ids in zip(sessions, prompts)])
    ends_at = list(itertools.accumulate(len(ids) for ids in prompts))
    together = ends.logits(hidden[[e - 1 for e in ends_at]])
    for i in range(len(prompts)):
        assert int(together[i].argmax()) == int(alone[i].argmax())
        assert (together[i] - alone[i][0]).abs().max() < 0.5
    for s in sessions:
        span.free(s)


def test_out_of_step_forward_is_rejected(quant_parts, tokenizer):
    _, span, ends = quant_parts
    s = new_session()
    span.forward(ends.embed([1, 2, 3]), [SpanRequest(s, 0, 3)])
    with pytest.raises(SessionOutOfStep):
        span.forward(ends.embed([4]), [SpanRequest(s, 5, 1)])
    span.free(s)


def test_budget_error_when_cache_is_full(weights, quant_parts):
    runtime, _, ends = quant_parts
    tiny = Span(weights, 0, 2, runtime, kv_budget_bytes=1)
    with pytest.raises(KVBudgetExceeded):
        tiny.forward(ends.embed([1, 2]), [SpanRequest("x", 0, 2)])


@pytest.mark.parametrize("parts", ["quant_parts", "eager_parts"])  # native kernels where they build, and eager
def test_a_decoding_session_is_bit_identical_alone_and_batched(parts, request, tokenizer):
    """Decode rows of every session attend in one batched call: a session's output must not
    depend on who else is in the batch (other lengths, a prefill beside it, its position in it)."""
    _, span, ends = request.getfixturevalue(parts)
    ids = tokenizer.encode("One session alone, then the same session among others of other lengths.")
    alone, batched = new_session(), new_session()
    others = [(new_session(), n) for n in (3, 40, 90)]
    for s in (alone, batched):
        span.forward(ends.embed(ids), [SpanRequest(s, 0, len(ids))])
    for s, n in others:
        span.forward(ends.embed((ids * 8)[:n]), [SpanRequest(s, 0, n)])
    newcomer = new_session()
    token, others_at = ids[-1], {s: n for s, n in others}
    for step in range(4):
        pos = len(ids) + step
        h_alone = span.forward(ends.embed([token]), [SpanRequest(alone, pos, 1)])
        requests = [SpanRequest(s, others_at[s], 1) for s, _ in others[:2]] + [SpanRequest(batched, pos, 1)]
        requests += [SpanRequest(others[2][0], others_at[others[2][0]], 1)]
        rows = [token] * len(requests)
        if step == 1:  # a prefill among the decodes
            requests.append(SpanRequest(newcomer, 0, 7))
            rows += ids[:7]
        h = span.forward(ends.embed(rows), requests)
        assert torch.equal(h[2:3], h_alone)
        for s, _ in others:
            others_at[s] += 1
        token = int(ends.logits(h_alone).argmax())
    for s in (alone, batched, newcomer, *(s for s, _ in others)):
        span.free(s)
    assert span.kv.sessions == {} and span.kv.used_bytes == 0


@pytest.mark.parametrize("parts", ["quant_parts", "eager_parts"])  # native kernels where they build, and eager
def test_a_verifying_session_is_bit_identical_alone_and_batched(parts, request, tokenizer):
    """Verifying a draft (a few rows of one session) goes through the same grouped attention:
    its rows must not depend on other sessions verifying or decoding beside it."""
    _, span, ends = request.getfixturevalue(parts)
    ids = tokenizer.encode("A draft of three tokens, checked alone and then among other sessions.")
    alone, batched, other, decoding = (new_session() for _ in range(4))
    for s, n in ((alone, len(ids)), (batched, len(ids)), (other, 20), (decoding, 50)):
        span.forward(ends.embed((ids * 4)[:n]), [SpanRequest(s, 0, n)])
    draft = ids[:3]
    h_alone = span.forward(ends.embed(draft), [SpanRequest(alone, len(ids), 3)])
    h = span.forward(ends.embed(ids[5:8] + [ids[0]] + draft),
                     [SpanRequest(other, 20, 3), SpanRequest(decoding, 50, 1), SpanRequest(batched, len(ids), 3)])
    assert torch.equal(h[4:7], h_alone)
    # And a grouped verification scores like single steps (the rollback path a rejection takes).
    span.rollback(batched, len(ids))
    steps = torch.cat([span.forward(ends.embed([t]), [SpanRequest(batched, len(ids) + i, 1)]) for i, t in enumerate(draft)])
    assert torch.equal(ends.logits(steps).argmax(-1), ends.logits(h_alone).argmax(-1))
    for s in (alone, batched, other, decoding):
        span.free(s)
