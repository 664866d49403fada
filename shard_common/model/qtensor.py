"""A weight as it is stored: raw GGML-quantized rows or a plain dense array.

Weights stay in their stored form until a layer is built, so the same object can be
written to a shard file, hashed, or turned into whichever kernel fits the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
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


# Types whose planes act on the input widened per 16 values: x_16, then 4 * x_16 (see _q6_k_plane).
WIDENED_INPUT_TYPES = (QT.Q6_K,)


def split_int4_planes(t: QTensor) -> list[Plane]:
    """Rows of a 4-, 5- or 6-bit type as 4-bit planes (codes int32 [N, K'] in 0..15, scale
    [N, K'/32], min [N, K'/32]) whose sum is the weight exactly (in float32): w = sum(codes *
    scale + min) per group of 32. 4-bit types are one plane; 5-bit types two: the low nibbles, and
    the fifth bit as a 0/1 plane worth 16 steps. Q6_K is one plane over a widened input
    (K' = 2K, ``WIDENED_INPUT_TYPES``)."""
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
        return _five_bit_planes(low, bits, d, m)
    if t.qtype == QT.Q5_K:
        # 256 values a block: d, dmin (f16), 12 bytes of sub-block scales and mins packed as in
        # Q4_K, 32 bytes of fifth bits (bit j of byte i: element 32*j + i), 128 bytes of nibbles
        # (as in Q4_K: per 64-value chunk, low nibbles first, then high nibbles).
        blocks = t.data.reshape(n, k // 256, 176)
        d, dmin = _f16(blocks[:, :, 0:2]), _f16(blocks[:, :, 2:4])
        sc, mn = _q4_k_scales_mins(blocks[:, :, 4:16])
        qh = blocks[:, :, 16:48]
        qs = blocks[:, :, 48:176].reshape(n, k // 256, 4, 32)
        low = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, k).astype(np.int32)
        bits = ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(n, k).astype(np.int32)
        scale = (d[..., None] * sc).reshape(n, k // 32).astype(np.float32)
        minimum = (-dmin[..., None] * mn).reshape(n, k // 32).astype(np.float32)
        return _five_bit_planes(low, bits, scale, minimum)
    if t.qtype == QT.Q6_K:
        return [_q6_k_plane(t)]
    return [split_q4_blocks(t)]


def _five_bit_planes(low: np.ndarray, bits: np.ndarray, scale: np.ndarray, minimum: np.ndarray) -> list[Plane]:
    return [(torch.from_numpy(low), torch.from_numpy(scale), torch.from_numpy(minimum)),
            (torch.from_numpy(bits), torch.from_numpy(16.0 * scale), torch.zeros(scale.shape))]


def _q6_k_plane(t: QTensor) -> Plane:
    """Q6_K as one int4 plane over a widened input. Its values are d * sc * (q - 32) with a scale
    per 16 values, and the int4 kernel wants one per 32: so each 16-value group becomes 32
    columns, its low nibbles (against x) and 4 * hi + 2 for its top two bits (against 4 * x),
    sharing the group's scale S = d * sc and min -8 * S:
    (lo - 8) * S * x + (4 * hi + 2 - 8) * S * 4x = (lo + 16 * hi - 32) * S * x, exactly.
    The cost: 8 bits a weight (the file has 6.56) and a matmul twice as wide."""
    n, k = t.shape
    nb = k // 256
    # 210 bytes a block: 128 of low nibbles (per 128-value half: low nibbles of 64 bytes, then
    # their high nibbles), 64 of 2-bit tops (per half: 4 shifts of 32 bytes), 16 int8 scales, d.
    blocks = t.data.reshape(n, nb, 210)
    ql = blocks[:, :, 0:128].reshape(n, nb, 2, 1, 64)
    low = ((ql >> np.array([0, 4], dtype=np.uint8)[:, None]) & 0x0F).reshape(n, k // 16, 16)
    qh = blocks[:, :, 128:192].reshape(n, nb, 2, 1, 32)
    high = ((qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3).reshape(n, k // 16, 16)
    sc = blocks[:, :, 192:208].copy().view(np.int8).astype(np.float32)
    scale = (_f16(blocks[:, :, 208:210])[..., None] * sc).reshape(n, k // 16)
    codes = np.concatenate([low, 4 * high + 2], axis=2).reshape(n, 2 * k).astype(np.int32)
    return torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(-8.0 * scale)


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
