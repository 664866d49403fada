"""GGUF files other than the bundled one: written here from tiny random transformers models, the
way llama.cpp's converter writes them (q/k rows permuted for llama and mistral), then loaded by our
loader and compared with transformers on the original weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFWriter
from gguf import quants as gguf_quants

from shard_common.model.loader import load_weights
from shard_common.tokenizer import Tokenizer

from .test_reference import ROPE_BASE, forward_logits, tiny_reference

transformers = pytest.importorskip("transformers")


HF_TO_GGUF = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to attn_q/attn_k rows (the layout our loader undoes)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, arch: str, spec, qtype: QT) -> None:
    cfg = model.config
    w = GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(spec.tokens)
    w.add_token_merges(spec.merges)
    w.add_token_types(spec.token_types)
    w.add_eos_token_id(spec.eos_id)
    w.add_chat_template(spec.chat_template)
    for name, tensor in model.state_dict().items():
        a = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            _, _, layer, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"
            if arch in ("llama", "mistral") and module in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if module.endswith("q_proj") else cfg.num_key_value_heads
                a = llama_cpp_permute(a, heads)
        if a.ndim == 2 and qtype != QT.F32 and gname.startswith("blk."):
            w.add_tensor(gname, gguf_quants.quantize(a, qtype), raw_shape=gguf_quants.quant_shape_to_byte_shape(a.shape, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,qtype", [("llama", QT.F32), ("mistral", QT.F32), ("qwen2", QT.F32), ("qwen3", QT.F32),
                                        ("llama", QT.Q8_0), ("qwen2", QT.Q4_0), ("qwen3", QT.Q4_0)])
def test_written_gguf_matches_transformers(tmp_path, weights, tokenizer, arch, qtype):
    ref = tiny_reference(arch, tokenizer.vocab_size, 2, 1)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, ref, arch, weights.tokenizer, qtype)
    loaded = load_weights(path)
    assert loaded.config.architecture == arch and loaded.config.n_layers == 2
    assert loaded.config.qkv_bias == (arch == "qwen2") and loaded.config.qk_norm == (arch == "qwen3")
    assert Tokenizer(loaded.tokenizer).encode("Hello there") == tokenizer.encode("Hello there")
    ids = tokenizer.encode("Tiny models are written and read back.")
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].float()
    if qtype == QT.F32:
        assert torch.allclose(forward_logits(loaded, "dense", ids), expected, atol=1e-4, rtol=1e-4)
    else:
        for backend in ("dense", "quant"):
            got = forward_logits(loaded, backend, ids)
            assert torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0) > 0.95
