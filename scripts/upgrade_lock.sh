#!/usr/bin/env bash
# Move the locks to the newest releases pyproject.toml's ranges allow, then run the whole suite
# in a fresh virtualenv with an empty HOME, as CI does. If a test fails, fix the code or narrow
# the range in pyproject.toml (with a comment saying why), run scripts/lock.sh, and try again;
# `git diff requirements/` shows what moved.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/lock.sh --upgrade
git --no-pager diff --stat -- requirements/ || true
exec bash .ci/run
