"""Streaming tokens as they are generated."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"), api_key=os.environ["OPENAI_API_KEY"])
model = os.environ.get("SHARD_MODEL", "SmolLM2-135M-Instruct.Q4_1")
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                        temperature=0, max_tokens=24, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
