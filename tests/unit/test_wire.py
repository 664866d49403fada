import pytest
import torch

from shard_common.wire import FrameError, tensor_from_bytes, tensor_to_bytes, wire_size


@pytest.mark.parametrize("dtype,tolerance", [("float32", 0.0), ("bfloat16", 1e-2), ("float16", 1e-3), ("int8", 1.2e-2)])
def test_hidden_states_survive_the_wire_within_the_dtypes_precision(dtype, tolerance):
    x = torch.randn(5, 576) * 3
    body = tensor_to_bytes(x, dtype)
    assert len(body) == wire_size((5, 576), dtype)
    y = tensor_from_bytes(body, dtype, (5, 576)).float()
    assert ((y - x).abs() / x.abs().amax(dim=-1, keepdim=True)).max() <= tolerance


def test_int8_is_a_quarter_of_float32_plus_scales_and_checks_sizes():
    assert wire_size((2, 576), "int8") == 2 * 576 + 2 * 18 * 2
    body = tensor_to_bytes(torch.randn(2, 576), "int8")
    with pytest.raises(FrameError):
        tensor_from_bytes(body[:-1], "int8", (2, 576))
    with pytest.raises(FrameError):
        tensor_from_bytes(body, "int8", (2, 577))
    with pytest.raises(ValueError):
        tensor_to_bytes(torch.randn(2, 30), "int8")
