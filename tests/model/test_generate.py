"""Local generation through the engine with the real model."""

from __future__ import annotations

from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def run(engine, tokenizer, messages, **params):
    seqs = [Sequence(tokenizer.encode_chat(messages), SamplingParams(**params), tokenizer, engine.context_length)]
    events = list(engine.generate(seqs))
    return seqs[0], "".join(e.text for _, e in events)


def test_greedy_answer_contains_paris(engine, tokenizer):
    seq, text = run(engine, tokenizer, QUESTION, max_tokens=30, temperature=0)
    assert "Paris" in text
    assert seq.finish_reason == "stop"
    assert text == seq.text


def test_greedy_is_deterministic(engine, tokenizer):
    msgs = [{"role": "user", "content": "Name three colors."}]
    assert run(engine, tokenizer, msgs, max_tokens=20, temperature=0)[1] == run(engine, tokenizer, msgs, max_tokens=20, temperature=0)[1]


def test_seeded_sampling_reproducible(engine, tokenizer):
    msgs = [{"role": "user", "content": "Tell me a short story."}]
    a = run(engine, tokenizer, msgs, max_tokens=20, temperature=1.0, seed=42)[1]
    b = run(engine, tokenizer, msgs, max_tokens=20, temperature=1.0, seed=42)[1]
    c = run(engine, tokenizer, msgs, max_tokens=20, temperature=1.0, seed=43)[1]
    assert a == b
    assert a != c


def test_max_tokens_ends_with_length(engine, tokenizer):
    seq, _ = run(engine, tokenizer, [{"role": "user", "content": "Write a long essay about rivers."}], max_tokens=5, temperature=0)
    assert seq.finish_reason == "length" and len(seq.output) == 5


def test_stop_sequence_cuts_text(engine, tokenizer):
    full = run(engine, tokenizer, QUESTION, max_tokens=30, temperature=0)[1]
    seq, text = run(engine, tokenizer, QUESTION, max_tokens=30, temperature=0, stop=["Paris"])
    assert seq.finish_reason == "stop"
    assert text == full[: full.index("Paris")]


def test_shared_prefill_matches_separate_prefill(engine, tokenizer):
    ids = tokenizer.encode_chat([{"role": "user", "content": "Give me a word."}])
    params = dict(max_tokens=12, temperature=0.9)
    first = Sequence(ids, SamplingParams(seed=1, **params), tokenizer, engine.context_length)
    forked = Sequence(ids, SamplingParams(seed=2, **params), tokenizer, engine.context_length, share_prefill_with=first)
    list(engine.generate([first, forked]))
    alone = Sequence(ids, SamplingParams(seed=2, **params), tokenizer, engine.context_length)
    list(engine.generate([alone]))
    assert [c.token for c in forked.output] == [c.token for c in alone.output]


def test_concurrent_sequences_match_solo_greedy(engine, tokenizer):
    prompts = [[{"role": "user", "content": p}] for p in ("What is 2+2?", "Say hello.", "What is the capital of France?")]
    solo = [run(engine, tokenizer, m, max_tokens=15, temperature=0)[1] for m in prompts]
    seqs = [Sequence(tokenizer.encode_chat(m), SamplingParams(max_tokens=15, temperature=0), tokenizer, engine.context_length) for m in prompts]
    list(engine.generate(seqs))
    assert [s.text for s in seqs] == solo
