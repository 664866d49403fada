#!/usr/bin/env bash
# Install everything and run the demo: an Oracle (with its embedded Redis) starts two Scout
# processes, splits the model's blocks between them, answers a question through the OpenAI API,
# then keeps serving on http://127.0.0.1:${SHARD_PORT:-8000} until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
port="${SHARD_PORT:-8000}"
export SHARD_ADMIN_KEY="${SHARD_ADMIN_KEY:-sk-oracle-demo-$(python -c 'import secrets; print(secrets.token_urlsafe(32))')}"
shard-oracle serve --port "$port" --local-scouts 2 --log-level info &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid' EXIT INT TERM
python scripts/demo_request.py "http://127.0.0.1:$port" "$SHARD_ADMIN_KEY" "${1:-What is the capital of France?}"
cat <<MSG
The Oracle is serving an OpenAI-compatible API at http://127.0.0.1:$port/v1
Admin key: $SHARD_ADMIN_KEY
Dashboard: http://127.0.0.1:$port/dashboard?key=$SHARD_ADMIN_KEY
Try: curl http://127.0.0.1:$port/v1/chat/completions -H "Authorization: Bearer \$KEY" \\
       -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "Hi"}]}'
Ctrl-C stops it.
MSG
wait $pid
