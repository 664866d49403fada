"""Where tensors run: activation dtypes per backend, and clear refusals when a GPU is asked for
and there is none (the CUDA branches themselves run only on a GPU: scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from shard_common.model.runtime import Runtime, cuda_int4_supported


def test_backends_pick_their_activation_and_cache_dtypes():
    assert Runtime.pick("quant", "cpu").dtype == torch.bfloat16 and not Runtime.pick("quant", "cpu").dense
    assert Runtime.pick("dense", "cpu").dtype == torch.float32 and Runtime.pick("dense", "cpu").dense
    assert Runtime.pick("dense-bf16", "cpu").dtype == torch.bfloat16 and Runtime.pick("dense-bf16", "cpu").dense
    assert Runtime.pick("quant", "cpu").kv_dtype == torch.float32  # CPU attention is faster in fp32
    with pytest.raises(ValueError, match="backend"):
        Runtime(backend="fp8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_a_clear_error_and_auto_means_the_cpu():
    with pytest.raises(ValueError, match="no CUDA device"):
        Runtime.pick("quant", "cuda")
    assert Runtime.pick("quant", "auto").device.type == "cpu" and Runtime.pick("quant").device.type == "cpu"
    assert not cuda_int4_supported(torch.device("cpu"))


def test_native_kernels_are_chosen_only_where_they_apply():
    with pytest.raises(ValueError, match="native kernels run the quant backend on CPU"):
        Runtime(backend="dense", kernels="native")
    with pytest.raises(ValueError, match="--kernels native"):
        Runtime.pick("dense", "cpu", "native")
    with pytest.raises(ValueError, match="kernels must be one of"):
        Runtime.pick("quant", "cpu", "fast")
    assert Runtime.pick("quant", "cpu", "eager").kernels == "eager" and Runtime.pick("quant", "cpu", "eager").native_ops is None
    assert Runtime.pick("dense", "cpu").kernels == "eager"  # auto: the reference path stays eager


def test_without_a_compiler_auto_runs_eager_and_says_why_and_native_refuses(tmp_path):
    """A machine with no C++ compiler (PATH without one) still serves, on the eager path."""
    import subprocess
    import sys

    code = ("from shard_common.model.runtime import Runtime\n"
            "print(Runtime.pick('quant', 'cpu').kernels)\n"
            "try:\n    Runtime.pick('quant', 'cpu', 'native')\nexcept ValueError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PATH": str(tmp_path), "HOME": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "eager"
    assert "refused: --kernels native: no c++" in out.stdout
    assert "running eager torch ops" in out.stderr
