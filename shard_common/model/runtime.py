"""Where and how tensors run: device, activation dtype, quantized kernels or dense reference."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

BACKENDS = ("quant", "dense", "dense-bf16")
KERNELS = ("auto", "native", "eager")


DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Runtime:
    """``quant``: keep 4/8-bit weights and use their kernels (bf16 activations: the int4 kernels
    take bf16, on CPU and CUDA alike); ``dense``: dequantized weights in fp32, the numeric
    reference; ``dense-bf16``: dequantized weights with bf16 activations (the plain-torch baseline
    benchmarks compare the int4 kernels with). The residual stream is fp32 everywhere (layers.py).
    ``kernels``: ``native`` runs the operations between a block's matmuls in the compiled CPU
    kernels (``native/``; quant backend on CPU only), ``eager`` in torch ops."""

    backend: str = "quant"
    device: torch.device = torch.device("cpu")
    kernels: str = "eager"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.kernels not in ("native", "eager"):
            raise ValueError(f"kernels must be native or eager, not {self.kernels!r}")
        if self.kernels == "native" and not native_fits(self.backend, self.device):
            raise ValueError(f"native kernels run the quant backend on CPU, not {self.backend} on {self.device}")

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

    @property
    def native_ops(self):
        """The compiled block operations, or None on the eager path."""
        if self.kernels != "native":
            return None
        from .native import load

        return load()

    @classmethod
    def pick(cls, backend: str = "quant", device: str | None = None, kernels: str = "auto") -> "Runtime":
        """``device``: "cpu", "cuda" (or "cuda:N"), or "auto"/None: CUDA when there is one.
        ``kernels``: "auto" takes the native CPU kernels where they apply and build, else eager;
        "native" insists (an error says why not)."""
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, not {kernels!r}")
        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        chosen = "eager"
        if kernels != "eager" and native_fits(backend, torch.device(device)):
            from .native import NativeUnavailable, load

            try:
                load()
                chosen = "native"
            except NativeUnavailable as exc:
                if kernels == "native":
                    raise ValueError(f"--kernels native: {exc}") from exc
                log.warning("%s: running eager torch ops between the matmuls (slower decode)", exc)
        elif kernels == "native":
            raise ValueError(f"--kernels native runs the quant backend on CPU, not {backend} on {device}")
        return cls(backend=backend, device=torch.device(device), kernels=chosen)


def native_fits(backend: str, device: torch.device) -> bool:
    """The native kernels take bf16 activations and an fp32 cache: the quant backend on CPU."""
    return backend == "quant" and device.type == "cpu"


def cuda_int4_supported(device: torch.device) -> bool:
    """torch's CUDA int4 weight-only kernel (tinygemm) needs compute capability 8.0 (Ampere) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
