"""The native CPU kernels for the operations between a block's matmuls and for the LM head's
int8 matmul (``block_ops.cpp``), compiled on first use with the machine's C++ compiler for this
CPU (``-march=native``) and cached under ``$TORCH_EXTENSIONS_DIR`` (by default
``~/.cache/torch_extensions``) in a folder named after the CPU's features and torch's version:
about 25 s once, then a load. Where no compiler (or no ninja) is found, ``load`` says why and the
model runs eager torch ops.

    python -m shard_common.model.native     # build now (the install script does)
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("block_ops.cpp")
# The source's own name: torch rebuilds when the source or the flags change.
NAME = "shard_block_ops"
# No contraction of a * b + c into one fused multiply-add: torch rounds the product first, and the
# kernels that follow its rounding must too.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp"]
# at::parallel_for is OpenMP in a header: without -fopenmp it runs serially. The library it links
# has torch's own libgomp's soname, so the loader hands it the runtime torch already loaded: one
# thread pool, sized by torch.set_num_threads.
LINK_FLAGS = ["-fopenmp"]

_loaded: ModuleType | None = None
_failure: str | None = None


class NativeUnavailable(RuntimeError):
    pass


def build_directory() -> Path:
    """One folder per kind of CPU and torch build: a home folder shared by two machines must not
    hand one of them code compiled for the other's instruction set."""
    import torch

    flags = ""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        pass
    tag = hashlib.sha256(f"{platform.machine()}|{flags}|{torch.__version__}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    path = root / f"{NAME}_{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _put_ninja_on_path() -> None:
    """torch calls ``ninja`` by name; the locked ninja package's binary is not on PATH when this
    virtualenv is not activated (a Scout started by its full path, a process started by a test)."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load() -> ModuleType:
    """The compiled module (built the first time on this machine); ``NativeUnavailable`` says why not."""
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    if _failure is not None:
        raise NativeUnavailable(_failure)
    _put_ninja_on_path()
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        _failure = f"no {' or '.join(missing)} on PATH to build the native CPU kernels"
        raise NativeUnavailable(_failure)
    from torch.utils.cpp_extension import load as build

    started = time.monotonic()
    log.info("loading the native CPU kernels (built once on this machine, ~25 s; then cached)")
    try:
        _loaded = build(NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=LINK_FLAGS, build_directory=str(build_directory()),
                        verbose=False)
    except Exception as exc:  # a compiler error, a missing header: the eager path still works
        _failure = f"building the native CPU kernels failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc!r}"
        raise NativeUnavailable(_failure) from exc
    log.info("native CPU kernels ready in %.1fs", time.monotonic() - started)
    return _loaded
