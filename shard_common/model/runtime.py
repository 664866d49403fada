"""Where and how tensors run: device, activation dtype, quantized kernels or dense reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("quant", "dense")


@dataclass(frozen=True)
class Runtime:
    """``quant``: keep 4/8-bit weights and use their kernels (bf16 activations on CPU, the fast
    path); ``dense``: dequantized weights in fp32 (fp16 on CUDA), the numeric reference."""

    backend: str = "quant"
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")

    @property
    def dtype(self) -> torch.dtype:
        if self.device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if self.backend == "quant" else torch.float32

    @property
    def kv_dtype(self) -> torch.dtype:
        """Attention runs in the cache's dtype. On CPU that is fp32: bf16 attention matmuls measured
        2x slower here, and the cache is small next to the weights for short contexts."""
        return torch.float32 if self.device.type == "cpu" else self.dtype

    @property
    def dense(self) -> bool:
        return self.backend == "dense"

    @classmethod
    def pick(cls, backend: str = "quant", device: str | None = None) -> "Runtime":
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(backend=backend, device=torch.device(device))
