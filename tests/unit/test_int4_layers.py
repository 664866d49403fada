"""4- and 5-bit GGML rows on the int4 weight-only kernel: the decoded codes, scales and mins reproduce
gguf's own dequantization exactly, and the layer's output matches a dense matmul over that
dequantization within the kernel's bfloat16 scales and activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from shard_common.model.linear import Int4Linear, make_linear
from shard_common.model.qtensor import QTensor, split_int4_planes

ROWS, COLS = 64, 512


def random_q4_k(rng: np.random.Generator) -> QTensor:
    """Valid Q4_K rows: random nibbles and packed 6-bit scales, small positive d and dmin."""
    blocks = rng.integers(0, 256, size=(ROWS, COLS // 256, 144), dtype=np.uint8)
    for offset, top in ((0, 0.004), (2, 0.004)):
        values = (rng.random((ROWS, COLS // 256)) * top).astype(np.float16)
        blocks[:, :, offset:offset + 2] = values[..., None].view(np.uint8).reshape(ROWS, COLS // 256, 2)
    return QTensor(QT.Q4_K, (ROWS, COLS), blocks.reshape(ROWS, -1))


def weights(qtype: QT, rng: np.random.Generator) -> QTensor:
    if qtype == QT.Q4_K:
        return random_q4_k(rng)  # gguf can dequantize Q4_K but not write it
    return QTensor.from_dense(torch.from_numpy(rng.standard_normal((ROWS, COLS)).astype(np.float32)) * 0.05, qtype)


TYPES = [QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1]


@pytest.mark.parametrize("qtype", TYPES)
def test_decoded_blocks_are_gguf_dequantization_exactly(qtype):
    w = weights(qtype, np.random.default_rng(1))
    planes = split_int4_planes(w)
    assert len(planes) == (2 if qtype in (QT.Q5_0, QT.Q5_1) else 1)
    ours = torch.zeros(ROWS, COLS, dtype=torch.float64)
    for codes, scale, minimum in planes:
        assert codes.min() >= 0 and codes.max() <= 15
        ours += (codes.reshape(ROWS, -1, 32).double() * scale[..., None].double() + minimum[..., None].double()).reshape(ROWS, COLS)
    reference = quants.dequantize(w.data, qtype).reshape(ROWS, COLS)
    assert np.array_equal(ours.float().numpy(), reference.astype(np.float32))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)), reason="needs a CUDA GPU of compute capability 8.0+"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", TYPES)
def test_int4_layer_matches_a_dense_matmul(qtype, device):
    rng = np.random.default_rng(2)
    w = weights(qtype, rng)
    layer = make_linear(w, None, torch.device(device), torch.bfloat16)
    assert isinstance(layer, Int4Linear)  # native, not dequantized
    x = torch.from_numpy(rng.standard_normal((5, COLS)).astype(np.float32)).bfloat16()
    dense = x.float() @ torch.from_numpy(quants.dequantize(w.data, qtype).reshape(ROWS, COLS)).t()
    out = layer(x.to(device)).float().cpu()
    # bf16 activations and bf16 scales/zeros: relative error of a few parts in a thousand of the output scale.
    assert (out - dense).abs().max() <= 1e-2 * dense.abs().max()
