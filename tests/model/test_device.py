"""The model on the test device (SHARD_TEST_DEVICE: the CPU here, CUDA in scripts/gpu_check.sh),
on a random Llama checkpoint written here (the GPU machine downloads no model): against
transformers on the same device, int4 on the device against int4 on the CPU, two spans against
one, and decoding with the KV cache and a rollback."""

from __future__ import annotations

import pytest
import torch
import transformers

from bench.random_models import write_random_llama
from shard_common.model.ends import ModelEnds
from shard_common.model.loader import load_weights
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span, SpanRequest

IDS = list(range(2, 42))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("random-llama") / "tiny", "tiny")


def logits(weights, backend: str, device: str, ids: list[int]) -> torch.Tensor:
    runtime = Runtime.pick(backend, device)
    span = Span(weights, 0, weights.config.n_layers, runtime)
    ends = ModelEnds(weights, runtime)
    return ends.logits(span.forward(ends.embed(ids), [SpanRequest("s", 0, len(ids))]))


def test_dense_matches_transformers_on_the_device(tiny, device):
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([IDS], device=device)).logits[0].float().cpu()
    ours = logits(load_weights(tiny), "dense", device, IDS)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()


def test_int4_on_the_device_tracks_int4_on_the_cpu(tiny, device):
    weights = load_weights(tiny, quantize="q4_0")
    here, cpu = logits(weights, "quant", device, IDS), logits(weights, "quant", "cpu", IDS)
    # Same int4 weights and bf16 activations: only the kernels' summation order differs (0 on the CPU).
    assert float((here - cpu).norm() / cpu.norm()) < 0.02
    dense = logits(weights, "dense", device, IDS)  # the same weights dequantized, fp32 activations
    assert torch.nn.functional.cosine_similarity(here.flatten(), dense.flatten(), dim=0) > 0.99


def test_two_spans_compute_what_one_does(tiny, device):
    weights = load_weights(tiny, quantize="q4_0")
    runtime = Runtime.pick("quant", device)
    whole, first, second = Span(weights, 0, 4, runtime), Span(weights, 0, 2, runtime), Span(weights, 2, 4, runtime)
    x = ModelEnds(weights, runtime).embed(IDS)
    request = [SpanRequest("s", 0, len(IDS))]
    assert torch.equal(whole.forward(x, request), second.forward(first.forward(x, request), request))


def test_greedy_decoding_with_the_cache_and_a_rollback(tiny, device):
    weights = load_weights(tiny, quantize="q4_0")
    runtime = Runtime.pick("quant", device)
    span, ends = Span(weights, 0, weights.config.n_layers, runtime), ModelEnds(weights, runtime)

    def decode(start: int, token: int, steps: int) -> list[int]:
        out = []
        for i in range(steps):
            token = int(ends.logits(span.forward(ends.embed([token]), [SpanRequest("s", start + i, 1)])).argmax())
            out.append(token)
        return out

    last = int(ends.logits(span.forward(ends.embed(IDS), [SpanRequest("s", 0, len(IDS))])[-1:]).argmax())
    first = decode(len(IDS), last, 12)
    span.rollback("s", len(IDS))
    assert decode(len(IDS), last, 12) == first
    assert span.kv.length("s") == len(IDS) + 12
    span.free("s")
