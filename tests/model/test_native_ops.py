"""The native CPU kernels (shard_common/model/native) against the eager torch ops they replace:
the same bits where the eager path's roundings can be followed exactly (norms, RoPE, conversions,
residual adds, activations), close where the sums run in another order (attention) — and the whole
model, SmolLM2 and Gemma 3 (sliding window, q|k norms, post-norms, GELU), through both paths."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from shard_common.model.ends import ModelEnds
from shard_common.model.layers import RotaryTable, apply_rope, rms_norm
from shard_common.model.loader import load_weights
from shard_common.model.native import load
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span, SpanRequest


@pytest.fixture(scope="module")
def ops():
    """Skipped only where there is no C++ compiler: with one, a build that fails is a failure."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine: the eager path runs")
    return load()


def test_where_the_kernels_build_the_quant_backend_on_cpu_uses_them(ops, quant_parts, device):
    runtime, span, _ = quant_parts
    if device != "cpu":
        pytest.skip("the native kernels are for the CPU")
    assert runtime.kernels == "native" and span.blocks[0].native is ops


@pytest.mark.parametrize("width", [64, 100, 576, 640, 1536])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_rms_norm_gives_the_eager_bits(ops, width, rows):
    torch.manual_seed(width * rows)
    x = torch.randn(rows, width) * torch.rand(rows, 1) * 10
    w = torch.randn(width)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(ops.rms_norm(x, w, 1e-6, dtype == torch.bfloat16), rms_norm(x, w, 1e-6, dtype))


def test_per_head_rms_norm_of_a_strided_bf16_view_gives_the_eager_bits(ops):
    """Qwen 3 / Gemma 3: q|k heads normalised in place of the fused projection's output."""
    torch.manual_seed(1)
    qkv = (torch.randn(5, 6 * 64) * 4).bfloat16()
    qk = qkv[:, : 4 * 64].view(5, 4, 64)
    w = torch.randn(4, 64)
    assert torch.equal(ops.rms_norm(qk, w, 1e-6, True), rms_norm(qk, w, 1e-6, torch.bfloat16))


def test_add_rms_norm_gives_the_eager_bits(ops):
    torch.manual_seed(2)
    h, w = torch.randn(7, 576) * 3, torch.randn(576)
    for y in (torch.randn(7, 576).bfloat16(), torch.randn(7, 576)):
        total, normed = ops.add_rms_norm(h, y, w, 1e-5)
        assert torch.equal(total, h + y)
        assert torch.equal(normed, rms_norm(h + y, w, 1e-5, torch.bfloat16))


def test_rope_writes_the_eager_keys_and_values_into_the_cache_slots(ops):
    torch.manual_seed(3)
    t, hq, hkv, hd = 3, 9, 3, 64
    table = RotaryTable(hd, 10000.0, 4096, torch.bfloat16, torch.device("cpu"))
    cos, sin = table.lookup(torch.tensor([5, 17, 300]), 301)
    qkv = torch.randn(t, (hq + 2 * hkv) * hd).bfloat16()
    qk, v = qkv[:, : (hq + hkv) * hd].view(t, hq + hkv, hd), qkv[:, (hq + hkv) * hd:].view(t, hkv, hd)
    stores = torch.zeros(2, 2, hkv, 64, hd)  # keys and values of two layers
    slots = torch.tensor([3, 9, 40])
    q = ops.rope_to_cache(qkv, None, cos, sin, 0.125, hq, hkv, stores[0], stores[1], 1, slots)
    keys, values = stores[0, 1], stores[1, 1]
    assert stores[:, 0].abs().sum() == 0  # the other layer untouched
    rotated = apply_rope(qk, cos, sin).float()
    assert torch.equal(q, rotated[:, :hq] * 0.125)
    assert torch.equal(keys[:, slots].transpose(0, 1), rotated[:, hq:])
    assert torch.equal(values[:, slots].transpose(0, 1), v.float())
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert keys[:, untouched].abs().sum() == 0 and values[:, untouched].abs().sum() == 0


def test_activation_times_up_gives_the_eager_bits(ops):
    torch.manual_seed(4)
    gate_up = (torch.randn(5, 2 * 1536) * 3).bfloat16()
    gate, up = gate_up.split([1536, 1536], dim=-1)
    assert torch.equal(ops.act_mul(gate_up, False), F.silu(gate) * up)
    assert torch.equal(ops.act_mul(gate_up, True), F.gelu(gate, approximate="tanh") * up)


def test_attention_rows_see_exactly_their_own_keys(ops):
    torch.manual_seed(5)
    hq, hkv, hd, n_slots = 9, 3, 64, 64
    keys, values = torch.randn(hkv, n_slots, hd), torch.randn(hkv, n_slots, hd)
    q = torch.randn(4, hq, hd) * 0.3
    slots = torch.tensor([1, 2, 3, 7, 8, 10, 11, 30, 31])
    rows, begin, count = torch.tensor([0, 1, 3]), torch.tensor([0, 2, 7]), torch.tensor([5, 4, 2])
    out = ops.attend(q, keys[None], values[None], 0, rows, slots, begin, count)
    for r, b, c in zip(rows.tolist(), begin.tolist(), count.tolist()):
        seen = slots[b:b + c]
        expected = torch.cat([torch.softmax(q[r, h] @ keys[h // 3, seen].T, -1) @ values[h // 3, seen] for h in range(hq)])
        assert (out[r].float() - expected).abs().max() < 1e-2  # bf16 output


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_int8_matmul_matches_torchs_int8_kernel_row_by_row(ops, rows):
    """The LM head's kernel: torch's arithmetic (fp32 sums, times the row's scale, bf16) in another
    summation order, a row's result independent of the others (N not a multiple of a tile)."""
    torch.manual_seed(rows)
    weight = torch.randint(-127, 128, (1000, 576), dtype=torch.int8)
    scales = (torch.rand(1000) / 100).bfloat16()
    x = torch.randn(rows, 576).bfloat16()
    packed = ops.pack_int8(weight)
    ours = ops.int8_matmul(x, packed, scales, 1000)
    theirs = torch._weight_int8pack_mm(x, weight, scales)
    assert ours.shape == (rows, 1000) and ours.dtype == torch.bfloat16
    assert torch.allclose(ours.float(), theirs.float(), rtol=2 ** -7, atol=1e-3)
    assert (ours != theirs).float().mean() < 0.01
    for r in range(rows):
        assert torch.equal(ops.int8_matmul(x[r:r + 1], packed, scales, 1000), ours[r:r + 1])


def test_bad_arguments_raise_instead_of_reading_out_of_bounds(ops):
    keys = values = torch.zeros(1, 3, 16, 64)
    q = torch.zeros(1, 9, 64)
    one = torch.tensor([0])
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.attend(q, keys, values, 0, one, torch.tensor([16]), one, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="row out of range"):
        ops.attend(q, keys, values, 0, torch.tensor([1]), torch.tensor([0]), one, torch.tensor([1]))
    with pytest.raises(RuntimeError, match="shape does not match"):
        ops.attend(q, keys, values, 1, one, torch.tensor([0]), one, torch.tensor([1]))
    qkv = torch.zeros(1, 15 * 64, dtype=torch.bfloat16)
    cos = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.rope_to_cache(qkv, None, cos, cos, 1.0, 9, 3, keys, values, 0, torch.tensor([99]))
    with pytest.raises(RuntimeError, match="bf16"):
        ops.act_mul(torch.zeros(1, 8), False)
    with pytest.raises(RuntimeError, match="packed"):
        ops.int8_matmul(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(2, 32, 16, dtype=torch.int8),
                        torch.zeros(32, dtype=torch.bfloat16), 32)


def spans(weights):
    return {kernels: Span(weights, 0, weights.config.n_layers, Runtime(kernels=kernels)) for kernels in ("eager", "native")}


def decode(span, ends, ids: list[int], steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill ``ids``, then feed ``steps`` greedy tokens one at a time: the prefill's hidden
    states and each step's."""
    prefill = span.forward(ends.embed(ids), [SpanRequest("s", 0, len(ids))])
    token, hidden = int(ends.logits(prefill[-1:]).argmax()), []
    for i in range(steps):
        hidden.append(span.forward(ends.embed([token]), [SpanRequest("s", len(ids) + i, 1)]))
        token = int(ends.logits(hidden[-1]).argmax())
    span.free("s")
    return prefill, hidden


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_native_block_follows_the_eager_one(ops, weights, tokenizer):
    both, ends = spans(weights), ModelEnds(weights, Runtime())
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    (eager_prefill, eager_steps), (native_prefill, native_steps) = (decode(both[k], ends, ids, 6) for k in ("eager", "native"))
    # Prefill attention is SDPA on both paths, and everything else rounds alike: the same bits.
    assert torch.equal(native_prefill, eager_prefill)
    # Decode attention sums in another order: the first step (same input) is close, not equal.
    assert relative(native_steps[0], eager_steps[0]) < 1e-2


def test_gemma3_through_the_native_kernels_past_its_window(ops, gemma_path):
    """Sliding-window blocks (a window of 512: decode at 600 sees its last 512 positions), q|k
    norms, post-norms and GELU through the native kernels, against the eager path."""
    gemma = load_weights(str(gemma_path))
    both, ends = spans(gemma), ModelEnds(gemma, Runtime())
    from shard_common.tokenizer import Tokenizer

    ids = Tokenizer(gemma.tokenizer).encode("The history of the city goes back two thousand years, from a small "
                                            "settlement on an island in the river to the capital of a kingdom. " * 30)[:600]
    (eager_prefill, eager_steps), (native_prefill, native_steps) = (decode(both[k], ends, ids, 3) for k in ("eager", "native"))
    assert torch.equal(native_prefill, eager_prefill)
    for native, eager in zip(native_steps, eager_steps):
        assert relative(native, eager) < 2e-2
        assert torch.equal(ends.logits(native).argmax(-1), ends.logits(eager).argmax(-1))
