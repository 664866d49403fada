"""Linear layers over stored weights, choosing the fastest exact-enough kernel per device.

CPU: Q4_0/Q4_1 run on torch's int4 weight-only kernel (lossless: the kernel computes
(code - 8) * scale + zero, and Q4_1's code * d + m equals that with zero = m + 8d);
Q8_0 runs on the int8 weight-only kernel after re-quantizing per row (that kernel has one
scale per output row, GGML has one per 32 values, so this is the one lossy step).
Everything else, and every weight on CUDA, runs dense in the activation dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from .qtensor import QTensor, split_q4_blocks

log = logging.getLogger(__name__)

INT4_TYPES = (QT.Q4_0, QT.Q4_1)
NATIVE_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1)
_warned_types: set[QT] = set()


class DenseLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int4Linear(torch.nn.Module):
    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.packed = packed
        self.scales_zeros = scales_zeros
        self.out_features = out_features
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]), self.packed, 32, self.scales_zeros)
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
        codes, d, m = split_q4_blocks(weight)
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
        zero = m + 8.0 * d
        scales_zeros = torch.stack([d.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return Int4Linear(packed, scales_zeros, weight.rows, b)
    if quant_ok and weight.qtype == QT.Q8_0:
        q, scale = quantize_rows_int8(weight.dequantize())
        return Int8Linear(q, scale.to(act_dtype), b)
    warn_if_emulated(weight.qtype, name)
    return DenseLinear(weight.dequantize().to(device=device, dtype=act_dtype), b)
