#!/usr/bin/env bash
# A chat completion with curl. OPENAI_BASE_URL defaults to http://127.0.0.1:8000/v1.
set -euo pipefail
curl -sS --fail-with-body "${OPENAI_BASE_URL:-http://127.0.0.1:8000/v1}/chat/completions" \
  -H "Authorization: Bearer ${OPENAI_API_KEY}" -H "Content-Type: application/json" \
  -d "{\"model\": \"${SHARD_MODEL:-SmolLM2-135M-Instruct.Q4_1}\", \"temperature\": 0, \"max_tokens\": 24,
       \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]}"
echo
