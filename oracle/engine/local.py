"""Build an engine that runs every block in this process (``shard-oracle generate``, benchmarks)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from shard_common.model.ends import ModelEnds
from shard_common.model.loader import load_weights
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span
from shard_common.model.weights import ModelWeights
from shard_common.tokenizer import Tokenizer

from .engine import Engine
from .pipeline import LocalPipeline

log = logging.getLogger(__name__)


@dataclass
class LocalModel:
    weights: ModelWeights
    tokenizer: Tokenizer
    engine: Engine


def build_local_model(model: str | None = None, backend: str = "quant", kv_budget_gb: float = 2.0, quantize: str | None = None,
                      speculative: str = "off", device: str = "cpu", kernels: str = "auto") -> LocalModel:
    t0 = time.monotonic()
    weights = load_weights(model, quantize=quantize)
    runtime = Runtime.pick(backend, device, kernels)
    tokenizer = Tokenizer(weights.tokenizer)
    pipeline = LocalPipeline(Span(weights, 0, weights.config.n_layers, runtime, kv_budget_bytes=int(kv_budget_gb * (1 << 30))))
    engine = Engine(ModelEnds(weights, runtime), pipeline, tokenizer, speculative=speculative)
    log.info("model %s ready in %.1fs (%s, %s on %s, %s kernels)", weights.name, time.monotonic() - t0, backend, runtime.dtype,
             runtime.device, runtime.kernels)
    return LocalModel(weights, tokenizer, engine)
