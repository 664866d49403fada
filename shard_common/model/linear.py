"""Linear layers over stored weights, choosing the fastest exact-enough kernel per device.

CPU: Q4_0/Q4_1/Q4_K run on torch's int4 weight-only kernel (group 32: the kernel computes
(code - 8) * scale + zero, and every 4-bit format's code * scale + min equals that with
zero = min + 8 * scale; Q4_K's scale is d * sc and its min -dmin * m per 32-value sub-block);
Q5_0/Q5_1/Q5_K as two such matmuls, the low nibbles and the fifth bit (a 0/1 plane worth 16
steps); Q6_K, whose scales cover 16 values, as one matmul over an input widened to twice its
width (qtensor._q6_k_plane). The kernel keeps scales and zeros in bfloat16, so this is exact
only up to their rounding (a fraction of a quantization step; tests/unit/test_int4_layers.py
states the bound).
Q8_0 runs on the int8 weight-only kernel after re-quantizing per row (that kernel has one
scale per output row, GGML has one per 32 values: lossy too). The exact alternative, one int8
matmul per 32-column group with that group's scales, measured as fast at batch 1 but 1.7x
slower at batch 8 on the 262k-row Gemma 3 head (and its scales would be bfloat16 again).
CUDA (compute capability 8.0 and newer): the same int4 formats on torch's CUDA int4 kernel
(tinygemm: the same (code - 8) * scale + zero per group of 32, its own packing: two codes a byte,
then ``_convert_weight_to_int4pack`` with 8 inner k-tiles, which needs K % 128 == 0 and N % 8 == 0).
Q8_0 runs dense in bf16 there (torch has no CUDA int8 weight-only kernel); so does a weight of
the wrong shape, and every weight on an older GPU (logged once).
Everything else runs dense in the activation dtype.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QT

from .qtensor import WIDENED_INPUT_TYPES, QTensor, split_int4_planes
from .runtime import cuda_int4_supported

log = logging.getLogger(__name__)

INT4_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q6_K)
NATIVE_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, *INT4_TYPES)
_warned: set = set()


class DenseLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


CUDA_INNER_K_TILES = 8


def pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Codes int32 [N, K] in 0..15 in the layout of ``device``'s int4 kernel."""
    if device.type == "cuda":
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        return torch._convert_weight_to_int4pack(pairs.to(device), CUDA_INNER_K_TILES)
    return torch._convert_weight_to_int4pack_for_cpu(codes, 2)


def int4_fits(device: torch.device, rows: int, cols: int) -> bool:
    """Whether ``device``'s int4 kernel takes a [rows, cols] weight."""
    if device.type == "cuda":
        return cols % (CUDA_INNER_K_TILES * 16) == 0 and rows % 8 == 0
    return cols % 32 == 0


def widen_input(x: torch.Tensor) -> torch.Tensor:
    """[T, K] -> [T, 2K]: each 16 values followed by 4 times them (the input of a Q6_K plane)."""
    groups = x.reshape(x.shape[0], -1, 16)
    return torch.cat([groups, groups * 4], dim=2).reshape(x.shape[0], -1)


class Int4Linear(torch.nn.Module):
    """One int4 matmul per plane (4-bit types and Q6_K have one, 5-bit types two), summed."""

    def __init__(self, planes: list[tuple[torch.Tensor, torch.Tensor]], out_features: int, bias: torch.Tensor | None,
                 widened: bool = False):
        super().__init__()
        self.planes = planes  # (packed codes, scales and zeros) each
        self.out_features = out_features
        self.bias = bias
        self.widened = widened
        on_cuda = planes[0][0].device.type == "cuda"
        self.matmul = torch._weight_int4pack_mm if on_cuda else torch._weight_int4pack_mm_for_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:  # the blocks' [T, d] needs no reshaping: each op saved counts at batch 1
            return self(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)
        if self.widened:
            x = widen_input(x)
        y = None
        for packed, scales_zeros in self.planes:
            part = self.matmul(x, packed, 32, scales_zeros)
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias
        return y


class Int8Linear(torch.nn.Module):
    """``native``: the native CPU kernels (``native/``), whose int8 matmul reads each weight once
    for all rows (torch's reloads them per row); the weight is then kept in its packed layout."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, native=None):
        super().__init__()
        self.out_features = weight.shape[0]
        self.native = native
        self.weight = native.pack_int8(weight) if native is not None else weight
        self.scales = scales
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if self.native is not None:
            y = self.native.int8_matmul(rows, self.weight, self.scales, self.out_features)
        else:
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def warn_once(key, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def warn_if_emulated(qtype: QT, name: str) -> None:
    if qtype not in NATIVE_TYPES:
        warn_once(qtype, "weights of type %s (first: %s) have no kernel here; dequantizing them to the activation dtype", qtype.name, name)


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
    native=None,
) -> torch.nn.Module:
    """Build the layer for ``weight`` ([out, in]). ``dense`` forces the reference dense path.
    ``native``: the native CPU kernels, for an int8 layer (the LM head passes them)."""
    b = bias.dequantize().to(device=device, dtype=act_dtype) if bias is not None else None
    on_cpu = device.type == "cpu"
    quant_ok = not dense and act_dtype == torch.bfloat16
    int4_ok = quant_ok and (on_cpu or cuda_int4_supported(device))
    if quant_ok and not int4_ok and weight.qtype in INT4_TYPES:
        warn_once(("old-gpu", str(device)), "int4 weights run dense on %s (compute capability below 8.0: no int4 kernel)", device)
    widened = weight.qtype in WIDENED_INPUT_TYPES
    if (int4_ok and weight.qtype in INT4_TYPES and len(weight.shape) == 2
            and int4_fits(device, weight.rows, weight.shape[1] * (2 if widened else 1))):
        planes = []
        for codes, d, m in split_int4_planes(weight):
            zero = m + 8.0 * d
            scales_zeros = torch.stack([d.t(), zero.t()], dim=-1).to(device=device, dtype=torch.bfloat16).contiguous()
            planes.append((pack_int4(codes, device), scales_zeros))
        return Int4Linear(planes, weight.rows, b, widened)
    if quant_ok and not on_cpu and weight.qtype == QT.Q8_0:
        warn_once(("q8-cuda", str(device)), "Q8_0 weights run dense in bf16 on %s (torch has no CUDA int8 weight-only kernel)", device)
    if quant_ok and on_cpu and weight.qtype == QT.Q8_0:
        q, scale = quantize_rows_int8(weight.dequantize())
        return Int8Linear(q, scale.to(act_dtype), b, native)
    warn_if_emulated(weight.qtype, name)
    return DenseLinear(weight.dequantize().to(device=device, dtype=act_dtype), b)
