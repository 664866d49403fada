"""Architecture hyper-parameters of a Llama-family model, independent of the file format."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    head_dim: int = 0
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen 3, Gemma 3)
    # Gemma 3: embeddings scaled by sqrt(d_model); norms after attention and after the MLP too;
    # GeGLU (tanh GELU); every ``global_every``-th block attends globally with ``rope_base``, the
    # others within ``sliding_window`` positions with ``rope_local_base``; q scaled by ``attn_scale``.
    embed_scale: float = 1.0
    post_norms: bool = False
    activation: str = "silu"  # or "gelu_tanh"
    sliding_window: int = 0  # 0: every block attends to every position
    global_every: int = 0
    rope_local_base: float = 0.0
    attn_scale: float = 0.0  # 0: head_dim ** -0.5

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", self.head_dim ** -0.5)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        """Does block ``layer`` attend only within the sliding window?"""
        return bool(self.sliding_window) and (not self.global_every or (layer + 1) % self.global_every != 0)

    def rope_base_of(self, layer: int) -> float:
        return self.rope_local_base if self.is_sliding(layer) and self.rope_local_base else self.rope_base

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**data)
