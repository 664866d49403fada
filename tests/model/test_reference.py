"""Our forward pass against transformers on the same weights (an independent implementation).

Tolerances: the dense path is fp32 end to end like the reference, so only summation order
differs (measured ~1e-5 on logits of magnitude ~25); 1e-3 leaves room for other BLAS builds.
The quantized path (int4 kernels, bf16 activations, per-row int8 head) is compared on what
matters for generation: the next-token choice and the perplexity of ordinary English.
"""

from __future__ import annotations

import math

import pytest
import torch

from shard_common.model.ends import ModelEnds
from shard_common.model.loader import load_weights
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span, SpanRequest

transformers = pytest.importorskip("transformers")

ROPE_BASE = 50000.0  # not the default, so a loader that misses it fails

ENGLISH = (
    "The history of the city goes back more than two thousand years. It was founded as a small "
    "fishing village on the banks of the river, and over the centuries it grew into a busy port. "
    "Merchants came from many countries to trade wool, wine and spices, and the town became rich. "
    "Today it is known for its old churches, its narrow streets and its lively markets."
)


def forward_logits(weights, backend: str, ids: list[int], device: str = "cpu") -> torch.Tensor:
    runtime = Runtime.pick(backend, device)
    span = Span(weights, 0, weights.config.n_layers, runtime)
    ends = ModelEnds(weights, runtime)
    hidden = span.forward(ends.embed(ids), [SpanRequest("s", 0, len(ids))])
    return ends.logits(hidden)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    target = torch.tensor(ids[1:])
    return math.exp(torch.nn.functional.cross_entropy(logits[:-1], target).item())


CONFIGS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}


def tiny_reference(arch: str, vocab_size: int, layers: int, seed: int):
    """A tiny random transformers model of ``arch``; norms (Qwen 3's per-head q/k norms included)
    get random weights, so a loader that drops one fails."""
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=ROPE_BASE,
        tie_word_embeddings=arch != "mistral", head_dim=16,
    )
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(getattr(transformers, CONFIGS[arch])(**common)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return ref


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_random_checkpoint_matches_transformers(tmp_path, tokenizer, arch, device):
    """Both sides on the test device (SHARD_TEST_DEVICE): on a GPU, ours against transformers there."""
    ref = tiny_reference(arch, tokenizer.vocab_size, 3, 0)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.hf.save(str(tmp_path / "tokenizer.json"))
    ids = tokenizer.encode("A tiny model still has to compute the same numbers.")
    with torch.no_grad():
        expected = ref.to(device)(torch.tensor([ids], device=device)).logits[0].float().cpu()
    ours = forward_logits(load_weights(tmp_path), "dense", ids, device)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=1e-4), (ours - expected).abs().max()
    # Quantized at load time: still the same model, within int4 noise (random weights quantize
    # worse than trained ones; measured cosine ~0.99).
    quant = forward_logits(load_weights(tmp_path, quantize="q4_1"), "quant", ids, device)
    cosine = torch.nn.functional.cosine_similarity(quant.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.95, cosine


@pytest.fixture(scope="module")
def reference_smollm(model_path, device):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, torch_dtype=torch.float32
    ).eval().to(device)


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()


def test_real_model_dense_matches_transformers(weights, tokenizer, reference_smollm, device):
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    expected = reference_logits(reference_smollm, ids)
    ours = forward_logits(weights, "dense", ids, device)
    assert (ours - expected).abs().max() < 1e-3


def test_quant_path_tracks_reference(weights, tokenizer, reference_smollm, device):
    ids = tokenizer.encode(ENGLISH)
    expected = reference_logits(reference_smollm, ids)
    quant = forward_logits(weights, "quant", ids, device)
    agree = (quant.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agree > 0.85, agree
    ppl_ref, ppl_quant = perplexity(expected, ids), perplexity(quant, ids)
    # A wrong RoPE layout lands near 44 on such text; the right one near 8.
    assert ppl_ref < 15 and ppl_quant < 1.15 * ppl_ref, (ppl_ref, ppl_quant)
