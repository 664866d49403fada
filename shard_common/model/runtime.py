"""Where and how tensors run: device, activation dtype, quantized kernels or dense reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BACKENDS = ("quant", "dense", "dense-bf16")


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Runtime:
    """``quant``: keep 4/8-bit weights and use their kernels (bf16 activations: the int4 kernels
    take bf16, on CPU and CUDA alike); ``dense``: dequantized weights in fp32, the numeric
    reference; ``dense-bf16``: dequantized weights with bf16 activations (the plain-torch baseline
    benchmarks compare the int4 kernels with). The residual stream is fp32 everywhere (layers.py)."""

    backend: str = "quant"
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.backend == "dense" else torch.bfloat16

    @property
    def kv_dtype(self) -> torch.dtype:
        """Attention runs in the cache's dtype. On CPU that is fp32: bf16 attention matmuls measured
        2x slower here, and the cache is small next to the weights for short contexts. On CUDA the
        activation dtype (bf16 tensor cores; half the cache memory)."""
        return torch.float32 if self.device.type == "cpu" else self.dtype

    @property
    def dense(self) -> bool:
        return self.backend != "quant"

    @classmethod
    def pick(cls, backend: str = "quant", device: str | None = None) -> "Runtime":
        """``device``: "cpu", "cuda" (or "cuda:N"), or "auto"/None: CUDA when there is one."""
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        return cls(backend=backend, device=torch.device(device))


def cuda_int4_supported(device: torch.device) -> bool:
    """torch's CUDA int4 weight-only kernel (tinygemm) needs compute capability 8.0 (Ampere) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
