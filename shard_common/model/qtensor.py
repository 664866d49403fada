"""A weight as it is stored: raw GGML-quantized rows or a plain dense array.

Weights stay in their stored form until a layer is built, so the same object can be
written to a shard file, hashed, or turned into whichever kernel fits the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGML_QUANT_SIZES
from gguf import quants as gguf_quants

DENSE_TYPES = {QT.F32: np.float32, QT.F16: np.float16}


@dataclass
class QTensor:
    """A 1-D or 2-D weight. ``shape`` is the logical (rows, cols) shape; ``data`` holds
    ``rows`` rows of raw bytes for quantized types, or the values themselves for F32/F16/BF16."""

    qtype: QT
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in DENSE_TYPES and self.qtype != QT.BF16

    @property
    def rows(self) -> int:
        return self.shape[0]

    def dequantize(self) -> torch.Tensor:
        """Float32 tensor of ``shape``."""
        if self.qtype in DENSE_TYPES:
            return torch.from_numpy(np.array(self.data, dtype=np.float32)).reshape(self.shape)
        if self.qtype == QT.BF16:
            raw = torch.from_numpy(np.ascontiguousarray(self.data).view(np.int16))
            return raw.view(torch.bfloat16).float().reshape(self.shape)
        values = gguf_quants.dequantize(np.ascontiguousarray(self.data), self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(self.shape)

    def take_rows(self, index: np.ndarray) -> "QTensor":
        """Rows reordered or selected; exact for every type since GGML blocks never span rows."""
        return QTensor(self.qtype, (len(index),) + tuple(self.shape[1:]), np.ascontiguousarray(self.data[index]))

    @staticmethod
    def concat_rows(parts: list["QTensor"]) -> "QTensor":
        qtype = parts[0].qtype
        if any(p.qtype != qtype or p.shape[1:] != parts[0].shape[1:] for p in parts):
            raise ValueError("can only concatenate weights of one type and width")
        rows = sum(p.rows for p in parts)
        return QTensor(qtype, (rows,) + tuple(parts[0].shape[1:]), np.concatenate([p.data for p in parts], axis=0))

    @staticmethod
    def from_dense(values: torch.Tensor, qtype: QT = QT.F32) -> "QTensor":
        """Store a float tensor, quantizing it to ``qtype`` (F32, F16, Q8_0, Q4_0, Q4_1, ...)."""
        array = values.detach().float().cpu().numpy()
        if qtype in DENSE_TYPES:
            return QTensor(qtype, tuple(array.shape), array.astype(DENSE_TYPES[qtype]))
        block, _ = GGML_QUANT_SIZES[qtype]
        if array.ndim != 2 or array.shape[1] % block:
            raise ValueError(f"{qtype.name} needs 2-D weights whose width is a multiple of {block}")
        return QTensor(qtype, tuple(array.shape), gguf_quants.quantize(array, qtype))


def split_q4_blocks(t: QTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode Q4_0/Q4_1 rows into (codes int32 [N, K] in 0..15, scale [N, K/32], min [N, K/32]),
    so that w = codes * scale + min exactly (Q4_0: min = -8 * scale)."""
    n, k = t.shape
    groups = k // 32
    if t.qtype == QT.Q4_1:
        blocks = t.data.reshape(n, groups, 20)
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[:, :, 4:20]
    elif t.qtype == QT.Q4_0:
        blocks = t.data.reshape(n, groups, 18)
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = -8.0 * d
        qs = blocks[:, :, 2:18]
    else:
        raise ValueError(f"not a 4-bit type: {t.qtype.name}")
    # Within a block the low nibbles hold elements 0..15 and the high nibbles 16..31.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k).astype(np.int32)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)
