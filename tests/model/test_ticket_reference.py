"""Golden tickets' right answers: an honest Scout matches them on every wire dtype (the Oracle
applies the wire's rounding as the Scout sees it), a noisy one does not."""

from __future__ import annotations

import pytest
import torch

from oracle.trust.reference import ReferenceModel
from oracle.trust.verdicts import Verdicts, relative_error
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span, SpanRequest
from shard_common.wire import through_wire


@pytest.mark.parametrize("wire", ["float32", "bfloat16", "float16", "int8"])
def test_honest_scouts_pass_and_noisy_ones_fail(weights, tokenizer, quant_parts, wire, device):
    """The Oracle's reference on the CPU; the Scout on the test device (a GPU Scout's honest error)."""
    _, _, ends = quant_parts
    reference = ReferenceModel(weights, Runtime.pick("quant", "cpu"))
    rows = ends.embed(tokenizer.encode_chat([{"role": "user", "content": "Explain how a bicycle stays upright."}])).float()
    tolerance = Verdicts(None).tolerance
    for backend in ("quant", "dense"):  # a Scout on other kernels and fp32 activations is honest too
        scout = Span(weights, 12, 30, Runtime.pick(backend, device))
        inputs, expected = reference.ticket(rows, (12, 30), wire)
        honest = through_wire(scout.forward(inputs, [SpanRequest("t", 0, len(rows))]), wire)
        scout.free("t")
        assert relative_error(honest, expected) < tolerance / 3
    noisy = honest + torch.randn_like(honest) * honest.std() * 0.1
    assert relative_error(noisy, expected) > tolerance
    assert all(h.local.kv.sessions == {} for h in reference.hops())
