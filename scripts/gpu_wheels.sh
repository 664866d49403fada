#!/usr/bin/env bash
# Wheels for the GPU device machine (Python 3.12, no package registry; it already has torch,
# transformers, safetensors, tokenizers, aiohttp, numpy and pytest): every pin of
# requirements/runtime.txt it lacks, for CPython 3.12 on manylinux x86_64, into ./wheels
# (git-ignored; carry it with the run: `carry: ["wheels"]`, 64 MiB in all).
# scripts/gpu_check.sh installs them with --no-index --no-deps before anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the device already has (and their own dependencies): never carried.
HAVE='^(torch|numpy|transformers|safetensors|tokenizers|huggingface-hub|aiohttp|aiohappyeyeballs|aiosignal|attrs|frozenlist|multidict|propcache|yarl|idna|pytest|pluggy|iniconfig|packaging|pyyaml|regex|requests|urllib3|certifi|charset-normalizer|filelock|fsspec|tqdm|typing-extensions|jinja2|markupsafe|sympy|mpmath|networkx|setuptools|hf-xet|nvidia-.*|triton)=='
rm -rf wheels && mkdir wheels
grep -E '^[A-Za-z0-9_.-]+==' requirements/runtime.txt | grep -viE "$HAVE" | sed 's/+cpu$//' > wheels/requirements.txt
# A package with no binary wheel for 3.12 (fastecdsa 2.3.2) is built here by a local Python 3.12.
if [ -z "${PY312:-}" ]; then
    for candidate in "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 "$(command -v python3.12 || true)"; do
        if [ -x "$candidate" ] && "$candidate" -c "" 2>/dev/null; then PY312=$candidate; break; fi
    done
fi
PY312=${PY312:-}
while read -r req; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform linux_x86_64 --platform any -d wheels "$req" 2>/dev/null && continue
    if [ -z "$PY312" ]; then
        echo "no binary wheel of $req for Python 3.12 and no python3.12 here to build one" >&2
        exit 1
    fi
    echo "building $req for Python 3.12"
    "$PY312" -m pip wheel --quiet --no-deps -w wheels "$req"
done < wheels/requirements.txt
du -sh wheels
