"""The openai Python client against a Shard Oracle (OPENAI_BASE_URL=http://host:8000/v1)."""

import os

from openai import OpenAI

client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"), api_key=os.environ["OPENAI_API_KEY"])
model = os.environ.get("SHARD_MODEL", "SmolLM2-135M-Instruct.Q4_1")
reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       temperature=0, max_tokens=24)
print(reply.choices[0].message.content)
print(reply.usage)
