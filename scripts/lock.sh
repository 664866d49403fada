#!/usr/bin/env bash
# Regenerate the dependency locks from pyproject.toml's ranges:
#   requirements/dev.txt      runtime + test + bench extras (the tests, CI, the benchmarks)
#   requirements/runtime.txt  runtime only, at the same versions (the demo, the Dockerfiles)
# Without flags every pin already in the locks is kept where the ranges still allow it (add or
# change a dependency in pyproject.toml, then run this). `--upgrade` moves every package to its
# newest allowed release instead: use scripts/upgrade_lock.sh for that, which also runs the suite.
# pip-tools runs from a throwaway virtualenv at a pinned version, so the lock does not depend on
# what this machine happens to have installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP_TOOLS_VERSION=7.6.2
upgrade=()
[ "${1:-}" = "--upgrade" ] && upgrade=(--upgrade)
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet "pip-tools==$PIP_TOOLS_VERSION"
compile=("$tools/venv/bin/pip-compile" --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links
         --no-emit-trusted-host "${upgrade[@]}")
"${compile[@]}" --extra test --extra bench -o requirements/dev.txt pyproject.toml
# The runtime lock is constrained by the dev lock, so the demo and the tests run the same versions.
"${compile[@]}" -c requirements/dev.txt -o requirements/runtime.txt pyproject.toml
# torch must be the CPU build: PyPI's default Linux wheel is a CUDA build that pulls several GB
# of nvidia-* packages. pip finds the CPU wheel through a find-links folder or PyTorch's CPU index
# (--extra-index-url https://download.pytorch.org/whl/cpu).
for lock in requirements/dev.txt requirements/runtime.txt; do
    if ! grep -q '^torch==[0-9.]*+cpu$' "$lock" || grep -q '^nvidia-' "$lock"; then
        echo "$lock: torch did not resolve to the CPU build; make the CPU wheel visible to pip and run again" >&2
        exit 1
    fi
done
echo "locked: $(grep -c '==' requirements/dev.txt) packages in requirements/dev.txt, $(grep -c '==' requirements/runtime.txt) in requirements/runtime.txt"
