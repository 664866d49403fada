"""Embedding sequences in the engine: prefill only, pooled over every chunk of the prompt, batched
beside generating sequences without disturbing them."""

from __future__ import annotations

import torch

from oracle.engine.engine import Engine
from oracle.engine.pipeline import LocalPipeline
from oracle.engine.sampler import SamplingParams
from oracle.engine.sequence import Sequence
from shard_common.model.span import SpanRequest

from .test_speculative_engine import assert_same_or_tied

TEXT = "Shard splits a model across volunteer machines, and every machine runs a span of its blocks in turn."


def embed(engine, tokenizer, texts, pooling="mean"):
    seqs = [Sequence(tokenizer.encode(t), SamplingParams(max_tokens=1), tokenizer, engine.context_length, pooling=pooling) for t in texts]
    list(engine.generate(seqs))
    return seqs


def test_mean_pooling_over_chunks_is_the_mean_over_the_prompt(quant_parts, tokenizer):
    _, span, ends = quant_parts
    whole = embed(Engine(ends, LocalPipeline(span), tokenizer), tokenizer, [TEXT])[0]
    chunked = embed(Engine(ends, LocalPipeline(span), tokenizer, prefill_chunk=5), tokenizer, [TEXT])[0]
    ids = tokenizer.encode(TEXT)
    hidden = span.forward(ends.embed(ids), [SpanRequest("reference", 0, len(ids))])
    span.free("reference")
    reference = torch.nn.functional.normalize(ends.final_hidden(hidden).mean(dim=0), dim=0)
    for s in (whole, chunked):
        assert s.finish_reason == "stop" and s.output == [] and s.embedding.shape == (576,)
        assert torch.allclose(s.embedding, reference, atol=2e-3)
    assert float(whole.embedding @ chunked.embedding) > 0.9999
    assert span.kv.sessions == {}


def test_last_token_pooling(quant_parts, tokenizer):
    _, span, ends = quant_parts
    last = embed(Engine(ends, LocalPipeline(span), tokenizer), tokenizer, [TEXT], pooling="last")[0]
    ids = tokenizer.encode(TEXT)
    hidden = span.forward(ends.embed(ids), [SpanRequest("reference", 0, len(ids))])
    span.free("reference")
    assert torch.allclose(last.embedding, torch.nn.functional.normalize(ends.final_hidden(hidden)[-1], dim=0), atol=2e-3)


def test_embeddings_batch_beside_generation(engine, tokenizer):
    prompt = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    alone = Sequence(prompt, params, tokenizer, engine.context_length)
    list(engine.generate([alone]))
    together = Sequence(prompt, params, tokenizer, engine.context_length)
    one_token = Sequence(tokenizer.encode("Hi")[:1], SamplingParams(max_tokens=1), tokenizer, engine.context_length, pooling="mean")
    vectors = [Sequence(tokenizer.encode(TEXT), SamplingParams(max_tokens=1), tokenizer, engine.context_length, pooling="mean"), one_token]
    list(engine.generate([together, *vectors]))
    assert_same_or_tied(alone, together)  # batched rows differ in the last bits: only a near-tie may flip
    assert all(v.embedding is not None and v.output == [] for v in vectors)  # a one-token input is read, never decoded
