"""Concurrent requests with the async openai client."""

import asyncio
import os

from openai import AsyncOpenAI


async def main() -> None:
    client = AsyncOpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"), api_key=os.environ["OPENAI_API_KEY"])
    model = os.environ.get("SHARD_MODEL", "SmolLM2-135M-Instruct.Q4_1")
    questions = ["What is the capital of France?", "Name a primary color.", "What is two plus two?"]
    replies = await asyncio.gather(*[client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24) for q in questions])
    for q, r in zip(questions, replies):
        print(f"{q} -> {r.choices[0].message.content}")


asyncio.run(main())
