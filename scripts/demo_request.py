"""Wait for an Oracle to be ready, then ask it one question through the OpenAI API (stdlib only)."""

import json
import sys
import time
import urllib.error
import urllib.request

url, key = sys.argv[1], sys.argv[2]
question = sys.argv[3] if len(sys.argv) > 3 else "What is the capital of France?"
deadline = time.monotonic() + 300
while True:
    try:
        urllib.request.urlopen(url + "/health", timeout=2)
        break
    except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
            sys.exit("the Oracle did not start; see its log above")
        time.sleep(0.5)
headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
models = json.load(urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers)))
model = models["data"][0]["id"]
body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "temperature": 0}).encode()
answer = json.load(urllib.request.urlopen(urllib.request.Request(url + "/v1/chat/completions", data=body, headers=headers)))
print(f"\nQ: {question}\nA: {answer['choices'][0]['message']['content']}\n   (stored as {answer['id']}, {answer['usage']['total_tokens']} tokens)\n")
