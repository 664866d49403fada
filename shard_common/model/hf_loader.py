"""Read a Hugging Face checkpoint folder (config.json + *.safetensors) into ``ModelWeights``,
optionally quantizing the block weights to GGML types at load time."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from safetensors import safe_open
from tqdm import tqdm

from .config import ModelConfig
from .qtensor import QTensor
from .weights import ModelWeights, TokenizerSpec

log = logging.getLogger(__name__)

QUANTIZE_TYPES = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q4_1": QT.Q4_1}
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(hf_name: str) -> str | None:
    m = LAYER_RE.match(hf_name)
    if m:
        short = LAYER_NAMES.get(m.group(2))
        return f"blk.{m.group(1)}.{short}.{m.group(3)}" if short else None
    stem, _, kind = hf_name.rpartition(".")
    return f"{TOP_NAMES[stem]}.{kind}" if stem in TOP_NAMES else None


def read_config(folder: Path) -> ModelConfig:
    cfg = json.loads((folder / "config.json").read_text())
    arch = ARCHITECTURES.get(cfg.get("model_type", ""))
    if arch is None:
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not supported ({', '.join(ARCHITECTURES)})")
    n_heads = cfg["num_attention_heads"]
    return ModelConfig(
        architecture=arch,
        n_layers=cfg["num_hidden_layers"],
        d_model=cfg["hidden_size"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        context_length=cfg.get("max_position_embeddings", 2048),
        # transformers 5 writes rope_theta inside rope_parameters; older versions at the top level.
        rope_base=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // n_heads,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        qk_norm=arch == "qwen3",
    )


def read_tokenizer(folder: Path) -> TokenizerSpec:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json")
    tok_json = path.read_text()
    vocab = json.loads(tok_json)
    ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}
    ids.update(vocab.get("model", {}).get("vocab", {}) or {})
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}

    def token_id(key: str) -> int | None:
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return ids.get(value) if value else None

    return TokenizerSpec(
        model="hf",
        tokenizer_json=tok_json,
        bos_id=token_id("bos_token"),
        eos_id=token_id("eos_token"),
        add_bos=bool(tcfg.get("add_bos_token", False)),
        chat_template=tcfg.get("chat_template"),
    )


def to_qtensor(t: torch.Tensor, quantize: QT | None) -> QTensor:
    if quantize is not None and t.ndim == 2 and t.shape[1] % 32 == 0:
        return QTensor.from_dense(t, quantize)
    if t.dtype == torch.bfloat16:
        return QTensor(QT.BF16, tuple(t.shape), t.contiguous().view(torch.int16).numpy().view(np.uint16))
    if t.dtype == torch.float16:
        return QTensor(QT.F16, tuple(t.shape), t.numpy())
    return QTensor(QT.F32, tuple(t.shape), t.float().numpy())


def load_hf_folder(folder: Path, quantize: str | None = None) -> ModelWeights:
    config = read_config(folder)
    qtype = None
    if quantize:
        if quantize not in QUANTIZE_TYPES:
            raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_TYPES)}")
        qtype = QUANTIZE_TYPES[quantize]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files")
    tensors: dict[str, QTensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in tqdm(list(st.keys()), desc=f"loading {f.name}", disable=len(st.keys()) < 200):
                name = gguf_name(key)
                if name is None:
                    continue
                # Norms and biases stay in float; only matrices of blocks (and the embedding, for
                # q8_0) are quantized, as llama.cpp does.
                is_block_matrix = name.startswith("blk.") and name.endswith(".weight") and not name.endswith("_norm.weight")
                wants = qtype if is_block_matrix or (qtype == QT.Q8_0 and name.startswith(("token_embd", "output."))) else None
                tensors[name] = to_qtensor(st.get_tensor(key), wants)
    log.info("loaded %s: %s, %d blocks", folder, config.architecture, config.n_layers)
    return ModelWeights(config=config, tensors=tensors, tokenizer=read_tokenizer(folder), name=folder.name)
