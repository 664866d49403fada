"""4-, 5- and 6-bit GGML rows on the int4 weight-only kernel: the decoded codes, scales and mins reproduce
gguf's own dequantization exactly, and the layer's output matches a dense matmul over that
dequantization within the kernel's bfloat16 scales and activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from shard_common.model.linear import Int4Linear, make_linear
from shard_common.model.qtensor import WIDENED_INPUT_TYPES, QTensor, split_int4_planes

ROWS, COLS = 64, 512


# K-quant blocks: bytes per 256 values, and where their f16 super-block scales sit.
K_QUANTS = {QT.Q4_K: (144, (0, 2)), QT.Q5_K: (176, (0, 2)), QT.Q6_K: (210, (208,))}


def random_k_quant(qtype: QT, rng: np.random.Generator) -> QTensor:
    """Valid K-quant rows: random codes and packed sub-block scales, small positive f16 scales."""
    width, scale_offsets = K_QUANTS[qtype]
    blocks = rng.integers(0, 256, size=(ROWS, COLS // 256, width), dtype=np.uint8)
    for offset in scale_offsets:
        values = (rng.random((ROWS, COLS // 256)) * 0.004).astype(np.float16)
        blocks[:, :, offset:offset + 2] = values[..., None].view(np.uint8).reshape(ROWS, COLS // 256, 2)
    return QTensor(qtype, (ROWS, COLS), blocks.reshape(ROWS, -1))


def weights(qtype: QT, rng: np.random.Generator) -> QTensor:
    if qtype in K_QUANTS:
        return random_k_quant(qtype, rng)  # gguf can dequantize K-quants but not write them
    return QTensor.from_dense(torch.from_numpy(rng.standard_normal((ROWS, COLS)).astype(np.float32)) * 0.05, qtype)


TYPES = [QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q5_0, QT.Q5_1, QT.Q5_K, QT.Q6_K]


def planes_as_dense(qtype: QT, planes) -> torch.Tensor:
    """The weight the planes compute, in float64: a widened plane's column pairs fold back
    (the low half against x, the high half against 4 * x)."""
    out = None
    for codes, scale, minimum in planes:
        assert codes.min() >= 0 and codes.max() <= 15
        values = (codes.reshape(ROWS, -1, 32).double() * scale[..., None].double() + minimum[..., None].double())
        if qtype in WIDENED_INPUT_TYPES:
            values = values[..., :16] + 4 * values[..., 16:]
        values = values.reshape(ROWS, COLS)
        out = values if out is None else out + values
    return out


@pytest.mark.parametrize("qtype", TYPES)
def test_decoded_blocks_are_gguf_dequantization_exactly(qtype):
    w = weights(qtype, np.random.default_rng(1))
    planes = split_int4_planes(w)
    assert len(planes) == (2 if qtype in (QT.Q5_0, QT.Q5_1, QT.Q5_K) else 1)
    ours = planes_as_dense(qtype, planes)
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
