"""A model's weights in stored form, under GGUF tensor names, plus what the tokenizer needs.

Both loaders (GGUF, Hugging Face folders) produce a ``ModelWeights``; everything downstream
(layers, shard files) reads only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import ModelConfig
from .qtensor import QTensor

BLOCK_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
    "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)
END_TENSORS = ("token_embd", "output_norm", "output")


@dataclass
class TokenizerSpec:
    """Everything needed to rebuild the tokenizer and chat template without the source file."""

    model: str  # "gpt2" (byte-level BPE), "llama" (SentencePiece BPE) or "hf" (tokenizer.json)
    tokens: list[str] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    pre: str = "default"
    tokenizer_json: str = ""
    bos_id: int | None = None
    eos_id: int | None = None
    extra_stop_ids: list[int] = field(default_factory=list)
    add_bos: bool = False
    add_space_prefix: bool = True  # SentencePiece: a "▁" before the text (Gemma's files say no)
    chat_template: str | None = None

    def vocab_digest(self) -> str:
        """What two models must share for one to draft for the other: the same token ids."""
        import hashlib

        if self.tokens:
            return hashlib.sha256("\n".join(self.tokens).encode()).hexdigest()[:16]
        return hashlib.sha256(self.tokenizer_json.encode()).hexdigest()[:16]


@dataclass
class ModelWeights:
    config: ModelConfig
    tensors: dict[str, QTensor]
    tokenizer: TokenizerSpec
    name: str = "model"

    def block(self, index: int) -> dict[str, QTensor]:
        """Tensors of block ``index`` keyed by short name (``attn_q``, ``attn_q.bias`` ...)."""
        prefix = f"blk.{index}."
        out = {}
        for full, t in self.tensors.items():
            if full.startswith(prefix):
                short = full[len(prefix):]
                out[short.removesuffix(".weight")] = t
        missing = [n for n in BLOCK_TENSORS if n not in out]
        if missing:
            raise ValueError(f"block {index} lacks tensors: {', '.join(missing)}")
        return out

    def ends(self) -> dict[str, QTensor]:
        out = {n: self.tensors[f"{n}.weight"] for n in END_TENSORS if f"{n}.weight" in self.tensors}
        if "output" not in out:
            out["output"] = out["token_embd"]
        return out
