#!/usr/bin/env bash
# Install everything and run the demo: the bundled model answers a question locally.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec shard-oracle generate "${1:-What is the capital of France?}"
