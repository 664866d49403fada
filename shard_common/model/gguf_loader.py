"""Read a Llama-family GGUF file into ``ModelWeights`` (tensors stay quantized)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .config import SUPPORTED_ARCHITECTURES, ModelConfig
from .gguf_file import GGUFFile
from .qtensor import QTensor
from .weights import ModelWeights, TokenizerSpec

log = logging.getLogger(__name__)

# llama.cpp's converter permutes the rows of attn_q/attn_k for these architectures so that its
# interleaved RoPE works; we undo that once here and use half-split RoPE everywhere.
PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")


def _field(reader: GGUFFile, key: str, default=None):
    return reader.fields.get(key, default)


def unpermute_rows(n_heads: int, rows: int) -> np.ndarray:
    """Row order that turns llama.cpp's interleaved q/k layout back into the half-split one."""
    head_dim = rows // n_heads
    return np.arange(rows).reshape(n_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


def read_config(reader: GGUFFile) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    d_model = int(_field(reader, f"{arch}.embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    has_bias = any(t.name == "blk.0.attn_q.bias" for t in reader.tensors)
    has_qk_norm = any(t.name == "blk.0.attn_q_norm.weight" for t in reader.tensors)
    gemma = {}
    if arch == "gemma3":
        # What llama.cpp hard-codes for the architecture (not in the file): every 6th block is
        # global, the sliding ones use RoPE base 10 000, q is scaled by 1/sqrt(head_dim).
        gemma = dict(embed_scale=d_model ** 0.5, post_norms=True, activation="gelu_tanh", global_every=6,
                     sliding_window=int(_field(reader, f"{arch}.attention.sliding_window", 0)), rope_local_base=10000.0)
    return ModelConfig(
        architecture=arch,
        n_layers=int(_field(reader, f"{arch}.block_count")),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        ffn_dim=int(_field(reader, f"{arch}.feed_forward_length")),
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        context_length=int(_field(reader, f"{arch}.context_length", 2048)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", d_model // n_heads)),
        tie_embeddings=not has_output,
        qkv_bias=has_bias,
        qk_norm=has_qk_norm,
        **gemma,
    )


# Gemma's turn format, for files that carry no template (the published Gemma 3 GGUFs do not):
# no system role, so a system message is folded into the first user turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] ~ '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
    "{% for m in messages %}"
    "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else 'user') ~ '\n' }}"
    "{{ ((system if loop.first else '') ~ (m['content'] or '')) | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def read_tokenizer(reader: GGUFFile) -> TokenizerSpec:
    model = _field(reader, "tokenizer.ggml.model", "gpt2")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eom = _field(reader, "tokenizer.ggml.eom_token_id")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    template = _field(reader, "tokenizer.chat_template")
    if _field(reader, "general.architecture") == "gemma3":
        template = template or GEMMA_TEMPLATE
        if eot is None and "<end_of_turn>" in tokens:
            eot = tokens.index("<end_of_turn>")  # the end of a model turn, as llama.cpp finds it
    return TokenizerSpec(
        model=model,
        tokens=tokens,
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        scores=[float(s) for s in _field(reader, "tokenizer.ggml.scores", [])],
        token_types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type", [])],
        pre=_field(reader, "tokenizer.ggml.pre", "default"),
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=eos,
        extra_stop_ids=sorted({int(t) for t in (eot, eom) if t is not None and t != eos}),
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama")),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        chat_template=template,
    )


def load_gguf(path: str | Path) -> ModelWeights:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    reader = GGUFFile(path)
    config = read_config(reader)
    tensors: dict[str, QTensor] = {}
    for t in reader.tensors:
        tensors[t.name] = QTensor(t.qtype, t.shape, t.data)
    if config.architecture in PERMUTED_QK_ARCHITECTURES:
        for i in range(config.n_layers):
            for name, heads in (("attn_q", config.n_heads), ("attn_k", config.n_kv_heads)):
                key = f"blk.{i}.{name}.weight"
                tensors[key] = tensors[key].take_rows(unpermute_rows(heads, tensors[key].rows))
    name = _field(reader, "general.name") or path.stem
    log.info("loaded %s: %s, %d blocks, %d tensors", path.name, config.architecture, config.n_layers, len(tensors))
    return ModelWeights(config=config, tensors=tensors, tokenizer=read_tokenizer(reader), name=name)
