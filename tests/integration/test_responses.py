"""The Responses API and embeddings through a real Oracle, with the real clients: the openai SDK,
the OpenAI Agents SDK with its default (Responses) model, LangChain with use_responses_api and
OpenAIEmbeddings."""

from __future__ import annotations

import base64
import json
import os

import jsonschema
import numpy as np
import openai
import pytest
import requests

from ..model.test_structured_engine import PERSON
from .conftest import ADMIN_KEY, client, create_key

WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
                          "additionalProperties": False}}


@pytest.fixture(scope="module")
def sdk(server):
    return client(server, ADMIN_KEY)


@pytest.fixture(scope="module")
def user_sdk(server, oracle):
    return client(server, create_key("responses-user", data_dir=os.path.dirname(oracle.log_path)))


def ask(sdk, model_id, prompt="What is the capital of France?", **kw):
    return sdk.responses.create(model=model_id, input=prompt, **{"temperature": 0, "max_output_tokens": 30, **kw})


def test_a_plain_response(sdk, model_id):
    r = ask(sdk, model_id, instructions="Answer in one sentence.")
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text" and r.output_text
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens and r.usage.output_tokens > 0
    assert r.instructions == "Answer in one sentence." and r.model == model_id


def test_streamed_deltas_equal_the_final_text(sdk, model_id):
    events = list(sdk.responses.create(model=model_id, input="Name three colors.", temperature=0, max_output_tokens=30, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == final.output_text
    assert final.output_text == ask(sdk, model_id, "Name three colors.").output_text


def test_max_output_tokens_makes_it_incomplete(sdk, model_id):
    r = sdk.responses.create(model=model_id, input="Write a long story about a dragon.", max_output_tokens=5)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 5


def test_previous_response_id_continues_the_conversation(sdk, model_id):
    first = ask(sdk, model_id)
    second = ask(sdk, model_id, "And of Italy?", previous_response_id=first.id)
    # The second turn's prompt holds the first turn's question and answer.
    assert second.usage.input_tokens >= first.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id and second.output_text


def test_retrieve_delete_and_input_items(sdk, user_sdk, model_id):
    r = user_sdk.responses.create(model=model_id, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}],
                                  max_output_tokens=5, metadata={"test": "store"})
    assert user_sdk.responses.retrieve(r.id).output_text == r.output_text
    items = user_sdk.responses.input_items.list(r.id).data
    assert [(i.type, i.role, i.content[0].text) for i in items] == [("message", "user", "Hi there")]
    assert sdk.responses.retrieve(r.id).id == r.id  # an admin sees every key's responses
    with pytest.raises(openai.NotFoundError):
        user_sdk.responses.retrieve("resp_nope")
    with pytest.raises(openai.NotFoundError):
        user_sdk.responses.create(model=model_id, input="x", previous_response_id="resp_" + "0" * 32, max_output_tokens=2)
    user_sdk.responses.delete(r.id)
    for fetch in (user_sdk.responses.retrieve, sdk.responses.retrieve, user_sdk.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            fetch(r.id)


def test_cross_key_404s(sdk, user_sdk, model_id):
    mine = ask(sdk, model_id, max_output_tokens=3)
    with pytest.raises(openai.NotFoundError):
        user_sdk.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        user_sdk.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        user_sdk.responses.create(model=model_id, input="x", previous_response_id=mine.id, max_output_tokens=2)
    assert sdk.responses.retrieve(mine.id).id == mine.id


def test_a_required_function_call_and_its_result(sdk, model_id):
    r = sdk.responses.create(model=model_id, input="What's the weather in Paris?", tools=[WEATHER], tool_choice="required",
                             temperature=0, max_output_tokens=60)
    calls = [o for o in r.output if o.type == "function_call"]
    assert calls and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    streamed = list(sdk.responses.create(model=model_id, input="What's the weather in Paris?", tools=[WEATHER], tool_choice="required",
                                         temperature=0, max_output_tokens=60, stream=True))
    arguments = "".join(e.delta for e in streamed if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == json.loads(calls[0].arguments)
    assert "response.function_call_arguments.done" in [e.type for e in streamed]
    # The result goes back as a function_call_output item, after the stored call.
    answer = sdk.responses.create(model=model_id, previous_response_id=r.id, tools=[WEATHER], max_output_tokens=40,
                                  input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 degrees, sunny"}])
    assert answer.status in ("completed", "incomplete") and answer.output
    # Its prompt holds the first turn, the call and the result.
    assert answer.usage.input_tokens > r.usage.input_tokens + r.usage.output_tokens


def test_a_json_schema_text_format(sdk, model_id):
    r = sdk.responses.create(model=model_id, input="Invent a person.", temperature=0, max_output_tokens=80,
                             text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_unsupported_and_bad_fields_are_400s(sdk, model_id):
    for kw, param in [(dict(tools=[{"type": "web_search"}]), "tools[0].type"), (dict(reasoning={"effort": "high"}), "reasoning"),
                      (dict(input=[{"type": "item_reference", "id": "x"}]), "input[0].type"), (dict(input=[]), "input")]:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.responses.create(model=model_id, **{"input": "x", **kw})
        assert e.value.body["param"] == param


def test_the_agents_sdk_default_model_answers_and_calls_a_tool(server, model_id):
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)
    set_default_openai_client(openai.AsyncOpenAI(base_url=server + "/v1", api_key=ADMIN_KEY, max_retries=0), use_for_tracing=False)
    plain = Agent(name="plain", instructions="Answer briefly.", model=model_id, model_settings=ModelSettings(temperature=0, max_tokens=30))
    assert "Paris" in Runner.run_sync(plain, "What is the capital of France?", max_turns=1).final_output
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is 21 degrees and sunny in {city}."

    caller = Agent(name="weather", instructions="Use the get_weather tool.", tools=[get_weather], model=model_id,
                   tool_use_behavior="stop_on_first_tool", model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60))
    result = Runner.run_sync(caller, "What's the weather in Paris?", max_turns=2)
    assert calls and result.final_output == f"It is 21 degrees and sunny in {calls[0]}."


def test_langchain_with_the_responses_api(server, model_id):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model_id, base_url=server + "/v1", api_key=ADMIN_KEY, temperature=0, max_tokens=30, max_retries=0,
                     use_responses_api=True)
    assert "Paris" in llm.invoke("What is the capital of France?").text


# --- embeddings ------------------------------------------------------------------------------------


def test_embeddings_of_strings_and_token_arrays(sdk, model_id, server):
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by eight percent.", "The cat sat on the mat."]
    r = sdk.embeddings.create(model=model_id, input=texts, encoding_format="float")
    vectors = np.array([d.embedding for d in r.data])
    assert vectors.shape == (3, 576) and [d.index for d in r.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[2] == pytest.approx(1.0, abs=1e-5) and vectors[0] @ vectors[1] < 0.99
    assert r.usage.prompt_tokens == r.usage.total_tokens > 0
    tokens = sdk.embeddings.create(model=model_id, input=[[1, 504, 3458], [1, 504, 3458, 30]], encoding_format="float")
    assert len(tokens.data) == 2 and len(tokens.data[0].embedding) == 576 and tokens.usage.prompt_tokens == 7
    raw = requests.post(server + "/v1/embeddings", json={"model": model_id, "input": texts[0], "encoding_format": "base64"},
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)
    short = sdk.embeddings.create(model=model_id, input=texts[0], dimensions=64, encoding_format="float").data[0].embedding
    assert len(short) == 64 and np.linalg.norm(short) == pytest.approx(1.0, abs=1e-5)


def test_embedding_errors(sdk, model_id):
    for kw, param in [(dict(input=""), "input"), (dict(input="x", dimensions=100000), "dimensions"), (dict(input=[[10 ** 9]]), "input"),
                      (dict(input="word " * 9000), "input")]:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.embeddings.create(model=model_id, **kw)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        sdk.embeddings.create(model=model_id, input="word " * 9000)
    assert e.value.body["code"] == "context_length_exceeded"


def test_langchain_embeddings_and_a_retrieval_sanity_check(server, model_id):
    from langchain_openai import OpenAIEmbeddings

    emb = OpenAIEmbeddings(model=model_id, base_url=server + "/v1", api_key=ADMIN_KEY, check_embedding_ctx_length=False, max_retries=0)
    cases = [("How do I bake bread?", "What is the recipe for making a loaf of bread?", "The stock market fell sharply today."),
             ("Where is the Eiffel Tower?", "In which city can you find the Eiffel Tower?", "Photosynthesis happens in plant leaves.")]
    for query, paraphrase, unrelated in cases:
        q = np.array(emb.embed_query(query))
        docs = np.array(emb.embed_documents([paraphrase, unrelated]))
        assert docs.shape == (2, 576)
        assert q @ docs[0] > q @ docs[1], query  # nearer to its paraphrase than to an unrelated sentence
