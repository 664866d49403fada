"""Linear layers over stored weights, choosing the fastest exact-enough kernel per device.

CPU: Q4_0/Q4_1/Q4_K run on torch's int4 weight-only kernel (group 32: the kernel computes
(code - 8) * scale + zero, and every 4-bit format's code * scale + min equals that with
zero = min + 8 * scale; Q4_K's scale is d * sc and its min -dmin * m per 32-value sub-block);
Q5_0/Q5_1 as two such matmuls, the low nibbles and the fifth bit (a 0/1 plane worth 16 steps).
The kernel keeps scales and zeros in bfloat16, so this is exact only up to their rounding (a
fraction of a quantization step; tests/unit/test_int4_layers.py states the bound).
Q8_0 runs on the int8 weight-only kernel after re-quantizing per row (that kernel has one
scale per output row, GGML has one per 32 values: lossy too).
Everything else, and every weight on CUDA, runs dense in the activation dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from .qtensor import QTensor, split_int4_planes

log = logging.getLogger(__name__)

INT4_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1)
NATIVE_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, *INT4_TYPES)
_warned_types: set[QT] = set()


class DenseLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int4Linear(torch.nn.Module):
    """One int4 matmul per plane (4-bit types have one, 5-bit types two), summed."""

    def __init__(self, planes: list[tuple[torch.Tensor, torch.Tensor]], out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.planes = planes  # (packed codes, scales and zeros) each
        self.out_features = out_features
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        y = None
        for packed, scales_zeros in self.planes:
            part = torch._weight_int4pack_mm_for_cpu(flat, packed, 32, scales_zeros)
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int8Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.scales = scales
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.weight.shape[0])


def warn_if_emulated(qtype: QT, name: str) -> None:
    if qtype not in NATIVE_TYPES and qtype not in _warned_types:
        _warned_types.add(qtype)
        log.warning("weights of type %s (first: %s) have no kernel here; dequantizing them to the activation dtype", qtype.name, name)


def quantize_rows_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 weight, float scale per row)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def make_linear(
    weight: QTensor,
    bias: QTensor | None,
    device: torch.device,
    act_dtype: torch.dtype,
    dense: bool = False,
    name: str = "",
) -> torch.nn.Module:
    """Build the layer for ``weight`` ([out, in]). ``dense`` forces the reference dense path."""
    b = bias.dequantize().to(device=device, dtype=act_dtype) if bias is not None else None
    on_cpu = device.type == "cpu"
    quant_ok = on_cpu and not dense and act_dtype == torch.bfloat16
    if quant_ok and weight.qtype in INT4_TYPES:
        planes = []
        for codes, d, m in split_int4_planes(weight):
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
            zero = m + 8.0 * d
            planes.append((packed, torch.stack([d.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()))
        return Int4Linear(planes, weight.rows, b)
    if quant_ok and weight.qtype == QT.Q8_0:
        q, scale = quantize_rows_int8(weight.dequantize())
        return Int8Linear(q, scale.to(act_dtype), b)
    warn_if_emulated(weight.qtype, name)
    return DenseLinear(weight.dequantize().to(device=device, dtype=act_dtype), b)
