"""LangChain's ChatOpenAI pointed at the Oracle."""

import os

from langchain_openai import ChatOpenAI

llm = ChatOpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"), api_key=os.environ["OPENAI_API_KEY"],
                 model=os.environ.get("SHARD_MODEL", "SmolLM2-135M-Instruct.Q4_1"), temperature=0, max_tokens=24)
print(llm.invoke("What is the capital of France?").content)
