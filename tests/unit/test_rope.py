"""The RoPE table grows with the positions in use, and a grown table equals a full one."""

import torch

from shard_common.model.layers import RotaryTable


def test_the_table_grows_on_demand_to_the_same_values():
    full = RotaryTable(8, 10000.0, 10000, torch.float32, torch.device("cpu"))
    RotaryTable.INITIAL_POSITIONS, before = 16, RotaryTable.INITIAL_POSITIONS
    try:
        small = RotaryTable(8, 10000.0, 10000, torch.float32, torch.device("cpu"))
    finally:
        RotaryTable.INITIAL_POSITIONS = before
    assert len(small.cos) == 16 and len(full.cos) == 4096
    positions = torch.tensor([3, 15, 700])
    cos, sin = small.lookup(positions, 701)
    assert len(small.cos) == 701  # grew to what was asked (more than double)
    assert torch.equal(cos, full.lookup(positions, 701)[0]) and torch.equal(sin, full.lookup(positions, 701)[1])
    small.lookup(torch.tensor([701]), 702)
    assert len(small.cos) == 1402  # doubled
    small.lookup(torch.tensor([9999]), 10000)
    assert len(small.cos) == 10000  # never past the model's context
