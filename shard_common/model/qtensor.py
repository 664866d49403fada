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


def _q4_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit scale and min of each of a Q4_K block's 8 sub-blocks, from its 12 packed bytes
    [..., 12]: sub-blocks 0-3 keep theirs in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins);
    4-7 put their low 4 bits in bytes 8-11 and their top 2 bits in the top bits of bytes 0-7."""
    q = packed.astype(np.uint8)
    low_sc, low_m = q[..., 0:4] & 63, q[..., 4:8] & 63
    high_sc = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    high_m = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    return np.concatenate([low_sc, high_sc], axis=-1), np.concatenate([low_m, high_m], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


Plane = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def split_int4_planes(t: QTensor) -> list[Plane]:
    """Rows of a 4- or 5-bit type as 4-bit planes (codes int32 [N, K] in 0..15, scale [N, K/32],
    min [N, K/32]) whose sum is the weight exactly (in float32): w = sum(codes * scale + min)
    per group of 32. 4-bit types are one plane; 5-bit types two: the low nibbles, and the fifth
    bit as a 0/1 plane worth 16 steps."""
    n, k = t.shape
    if t.qtype in (QT.Q5_0, QT.Q5_1):
        groups = k // 32
        width = 22 if t.qtype == QT.Q5_0 else 24
        blocks = t.data.reshape(n, groups, width)
        d = _f16(blocks[:, :, 0:2])
        m = -16.0 * d if t.qtype == QT.Q5_0 else _f16(blocks[:, :, 2:4])
        head = 2 if t.qtype == QT.Q5_0 else 4
        high = blocks[:, :, head:head + 4].copy().view("<u4")[..., 0]  # bit j is element j's fifth bit
        qs = blocks[:, :, head + 4:width]
        low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k).astype(np.int32)
        bits = ((high[..., None] >> np.arange(32, dtype=np.uint32)) & 1).reshape(n, k).astype(np.int32)
        return [(torch.from_numpy(low), torch.from_numpy(d), torch.from_numpy(m)),
                (torch.from_numpy(bits), torch.from_numpy(16.0 * d), torch.zeros(n, groups))]
    return [split_q4_blocks(t)]


def split_q4_blocks(t: QTensor) -> Plane:
    """Decode 4-bit rows (Q4_0, Q4_1, Q4_K) into (codes int32 [N, K] in 0..15, scale [N, K/32],
    min [N, K/32]), so that w = codes * scale + min exactly (in float32) per group of 32."""
    n, k = t.shape
    groups = k // 32
    if t.qtype == QT.Q4_K:
        # 256 values a block: d, dmin (f16), 12 bytes of 6-bit sub-block scales and mins, 128
        # bytes of nibbles. Sub-block j's values are d*sc_j*q - dmin*m_j; in each 64-value chunk
        # the low nibbles of its 32 bytes are the first sub-block, the high nibbles the second.
        blocks = t.data.reshape(n, k // 256, 144)
        d, dmin = _f16(blocks[:, :, 0:2]), _f16(blocks[:, :, 2:4])
        sc, mn = _q4_k_scales_mins(blocks[:, :, 4:16])
        scale = (d[..., None] * sc).reshape(n, groups)
        minimum = (-dmin[..., None] * mn).reshape(n, groups)
        qs = blocks[:, :, 16:144].reshape(n, k // 256, 4, 32)
        codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k).astype(np.int32)
        return torch.from_numpy(codes), torch.from_numpy(scale.astype(np.float32)), torch.from_numpy(minimum.astype(np.float32))
    if t.qtype == QT.Q4_1:
        blocks = t.data.reshape(n, groups, 20)
        d, m = _f16(blocks[:, :, 0:2]), _f16(blocks[:, :, 2:4])
        qs = blocks[:, :, 4:20]
    elif t.qtype == QT.Q4_0:
        blocks = t.data.reshape(n, groups, 18)
        d = _f16(blocks[:, :, 0:2])
        m = -8.0 * d
        qs = blocks[:, :, 2:18]
    else:
        raise ValueError(f"not a 4-bit type: {t.qtype.name}")
    # Within a block the low nibbles hold elements 0..15 and the high nibbles 16..31.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k).astype(np.int32)
    return torch.from_numpy(codes), torch.from_numpy(d), torch.from_numpy(m)
