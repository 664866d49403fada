"""The Oracle driven by the official openai client (sync and async) and langchain-openai."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .conftest import ADMIN_KEY

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=ADMIN_KEY, max_retries=0)


def test_models_list_and_retrieve(client, model_id):
    ids = [m.id for m in client.models.list()]
    assert ids == [model_id, "smollm2"]
    assert client.models.retrieve("smollm2").owned_by == "shard"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


def test_chat_greedy_contains_paris_and_is_deterministic(client, model_id):
    a = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0)
    b = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0)
    assert "Paris" in a.choices[0].message.content
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.id.startswith("chatcmpl-") and a.object == "chat.completion"
    assert a.choices[0].finish_reason == "stop"
    u = a.usage
    assert u.prompt_tokens > 10 and u.completion_tokens > 3 and u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_unprefixed_base_url(server, model_id):
    c = openai.OpenAI(base_url=server, api_key=ADMIN_KEY, max_retries=0)
    r = c.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, max_tokens=12)
    assert "Paris" in r.choices[0].message.content


def test_seeded_sampling_reproducible(client, model_id):
    msgs = [{"role": "user", "content": "Invent a name for a cat."}]
    kw = dict(model=model_id, messages=msgs, temperature=1.0, seed=1234, max_tokens=20)
    assert client.chat.completions.create(**kw).choices[0].message.content == client.chat.completions.create(**kw).choices[0].message.content


def test_n_choices(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=QUESTION, n=3, temperature=1.0, seed=5, max_tokens=10)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content for c in r.choices)
    assert r.usage.completion_tokens >= 3
    assert len({c.message.content for c in r.choices}) > 1  # differently seeded choices


def test_max_tokens_length(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Write a long story."}], max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_stop_sequences_cut_text(client, model_id):
    full = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0).choices[0].message.content
    r = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, stop=["Paris", "zzz"])
    assert r.choices[0].message.content == full[: full.index("Paris")]
    assert r.choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(client, model_id):
    full = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, stop=["Paris"])
    chunks = list(client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, stop=["Paris"], stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_logprobs(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, logprobs=True, top_logprobs=3, max_tokens=6)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.token == t.top_logprobs[0].token  # greedy picks the most likely token


def test_legacy_completions(client, model_id):
    r = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    many = client.completions.create(model=model_id, prompt=["One, two,", "A, B,"], max_tokens=3, temperature=0, echo=True)
    assert [c.text.split(",")[0] for c in many.choices] == ["One", "A"]
    tokens = client.completions.create(model=model_id, prompt=[504, 3575], max_tokens=2, temperature=0)
    assert tokens.usage.prompt_tokens == 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    best = client.completions.create(model=model_id, prompt="Hello", max_tokens=4, best_of=3, n=1, temperature=1.0, seed=3)
    assert len(best.choices) == 1


def test_async_client_concurrent_requests(server, model_id):
    async def main():
        c = openai.AsyncOpenAI(base_url=server + "/v1", api_key=ADMIN_KEY, max_retries=0)
        prompts = ["Say hello.", "What is 2+2?", "What is the capital of France?", "Name a fruit."]
        solo = [(await c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=12)).choices[0].message.content for p in prompts]
        together = await asyncio.gather(*[
            c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=12) for p in prompts
        ])
        stream = await c.chat.completions.create(model=model_id, messages=QUESTION, temperature=0, stream=True)
        streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        await c.close()
        return solo, [r.choices[0].message.content for r in together], streamed

    solo, together, streamed = asyncio.run(main())
    assert together == solo
    assert "Paris" in streamed


def test_langchain_invoke_and_stream(server, model_id):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server + "/v1", api_key=ADMIN_KEY, model=model_id, temperature=0, max_tokens=20, max_retries=0)
    answer = llm.invoke("What is the capital of France?")
    assert "Paris" in answer.content
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert streamed == answer.content


def test_speculative_decoding_per_request(client, server, model_id, admin_headers):
    """The server speculates by default (prompt lookup); a request can turn it off through the
    openai client's extra_body. On a copying prompt it drafts and accepts tokens, and the
    cluster status counts them."""
    import requests

    copy = [{"role": "user", "content": "Repeat exactly: the red fox and the blue bird sat on the old stone wall."}]
    before = requests.get(server + "/v1/cluster/status", headers=admin_headers, timeout=10).json()["speculative"]
    spec = client.chat.completions.create(model=model_id, messages=copy, temperature=0, max_tokens=30)
    after = requests.get(server + "/v1/cluster/status", headers=admin_headers, timeout=10).json()["speculative"]
    plain = client.chat.completions.create(model=model_id, messages=copy, temperature=0, max_tokens=30,
                                           extra_body={"speculative": "off"})
    assert after["mode"] == "auto" and "ngram" in after["drafters"]
    assert after["passes"] > before["passes"] and after["accepted"] > before["accepted"]
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.usage.completion_tokens == plain.usage.completion_tokens
