"""Structured outputs and tool calling through a real Oracle, driven by the real client libraries:
the openai SDK, langchain-openai, pydantic-ai and the OpenAI Agents SDK. Every output is validated
against its JSON schema with ``jsonschema``, never only parsed. Schemas bound their strings and
numbers: a 135M model, constrained to valid JSON, will otherwise happily write digits forever."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from ..model.test_structured_engine import PERSON
from .conftest import ADMIN_KEY, client

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "description": "Get the local time in a city.",
                 "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}},
}
TOOLS = [WEATHER, TIME]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]



class Capital(BaseModel):
    country: str = Field(max_length=30)
    capital: str = Field(max_length=30)


@pytest.fixture(scope="module")
def sdk(server):
    return client(server, ADMIN_KEY)


def assert_valid_calls(calls, names=None) -> None:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or PARAMETERS)
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_parse_with_a_pydantic_model(sdk, model_id):
    r = sdk.chat.completions.parse(model=model_id, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                   response_format=Capital, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Capital)
    jsonschema.validate(json.loads(choice.message.content), Capital.model_json_schema())


def test_json_object(sdk, model_id):
    r = sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Describe Paris in JSON."}],
                                    response_format={"type": "json_object"}, temperature=0, max_tokens=120)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), {"type": "object"})


def test_json_schema_strict_streamed_with_three_sampled_choices(sdk, model_id):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    stream = sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Invent a person who lives in Europe."}], n=3,
                                         temperature=1, seed=11, max_tokens=80, response_format=fmt, stream=True)
    texts, finish = ["", "", ""], [None] * 3
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish[c.index]
    assert finish == ["stop"] * 3, texts
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 1  # three samples, not one answer three times


def test_vllm_and_llama_cpp_grammar_extensions(sdk, model_id):
    def ask(question, **extra):
        r = sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": question}], temperature=0.8, seed=3,
                                        max_tokens=20, extra_body=extra)
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content

    assert ask("Is the sky blue?", structured_outputs={"choice": ["yes", "no"]}) in ("yes", "no")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", ask("A phone number?", structured_outputs={"regex": "[0-9]{3}-[0-9]{4}"}))
    jsonschema.validate(json.loads(ask("A person?", structured_outputs={"json": PERSON})), PERSON)
    assert ask("A colour?", grammar='root ::= "red" | "green" | "blue"') in ("red", "green", "blue")


def test_same_seed_same_structured_output(sdk, model_id):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    texts = {sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Invent a person."}], temperature=1,
                                         seed=5, max_tokens=80, response_format=fmt).choices[0].message.content for _ in range(2)}
    assert len(texts) == 1
    jsonschema.validate(json.loads(texts.pop()), PERSON)


def test_tool_choice_required_and_named(sdk, model_id):
    r = sdk.chat.completions.create(model=model_id, messages=ASK_WEATHER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=80)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = sdk.chat.completions.create(model=model_id, messages=ASK_WEATHER, tools=TOOLS, tool_choice=named, temperature=0, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(r.choices[0].message.tool_calls, ["get_time"])
    assert len(r.choices[0].message.tool_calls) == 1


def test_tool_choice_none_and_auto(sdk, model_id):
    r = sdk.chat.completions.create(model=model_id, messages=ASK_WEATHER, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    for seed in range(3):
        r = sdk.chat.completions.create(model=model_id, messages=ASK_WEATHER, tools=TOOLS, temperature=1, seed=seed, max_tokens=60)
        message = r.choices[0].message
        if message.tool_calls:  # the model chose a call: then it is a valid one, and no markup is left in the content
            assert r.choices[0].finish_reason == "tool_calls"
            assert_valid_calls(message.tool_calls)
        assert "<tool_call>" not in (message.content or "")


def test_streamed_tool_calls_reassemble_to_the_unstreamed_ones(sdk, model_id):
    args = dict(model=model_id, messages=[{"role": "user", "content": "Weather and time in Paris and in Rome?"}], tools=TOOLS,
                tool_choice="required", temperature=0, max_tokens=160)
    whole = sdk.chat.completions.create(**args).choices[0].message.tool_calls
    calls, content, finish, ident = {}, "", None, None
    for chunk in sdk.chat.completions.create(stream=True, **args):
        ident = chunk.id
        delta = chunk.choices[0].delta
        content += delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
        for d in delta.tool_calls or []:
            if d.id is not None:
                assert d.index not in calls and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls" and content == ""
    streamed = [calls[i] for i in sorted(calls)]
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [(c.function.name, json.loads(c.function.arguments)) for c in whole]
    assert_valid_calls(whole)
    # The stored completion carries the ids the stream announced.
    stored = sdk.chat.completions.retrieve(ident).choices[0].message.tool_calls
    assert [c.id for c in stored] == [c["id"] for c in streamed] and len(set(c["id"] for c in streamed)) == len(streamed)


def test_a_tool_result_round_trip_is_prompt_text_and_stored(sdk, model_id, server):
    call = sdk.chat.completions.create(model=model_id, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=60).choices[0].message.tool_calls[0]
    history = [*ASK_WEATHER, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}]
    result = {"role": "tool", "tool_call_id": call.id, "content": "It is 21 degrees and sunny in Paris, with a light breeze from the west."}
    without = sdk.chat.completions.create(model=model_id, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=1, store=False)
    answer = sdk.chat.completions.create(model=model_id, messages=[*history, result], tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_tokens=30, store=True, metadata={"test": "round-trip"})
    # The call and its result are in the prompt, not dropped: the result alone is ~20 tokens.
    assert answer.usage.prompt_tokens >= without.usage.prompt_tokens + 15
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    stored = sdk.chat.completions.messages.list(answer.id).data
    assert [m.role for m in stored] == ["user", "assistant", "tool"]
    assert stored[1].tool_calls[0].id == call.id and stored[2].tool_call_id == call.id


def test_deprecated_functions(sdk, model_id):
    r = sdk.chat.completions.create(model=model_id, messages=ASK_WEATHER, functions=[WEATHER["function"]],
                                    function_call={"name": "get_weather"}, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    jsonschema.validate(json.loads(choice.message.function_call.arguments), PARAMETERS["get_weather"])


def test_tools_with_a_response_format_answer_json_or_call(sdk, model_id):
    """What agent frameworks send on the turn after a tool result: tools and an output schema."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(3):
        r = sdk.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Invent a person who lives in Europe."}], tools=TOOLS,
                                        response_format=fmt, temperature=1, seed=seed, max_tokens=80)
        message = r.choices[0].message
        if message.tool_calls:
            assert_valid_calls(message.tool_calls)
        else:
            jsonschema.validate(json.loads(message.content), PERSON)


# --- agent frameworks ------------------------------------------------------------------------------


class Weather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=30, description="the city")


def test_langchain_bind_tools_and_structured_output(server, model_id):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model_id, base_url=server + "/v1", api_key=ADMIN_KEY, temperature=0, max_tokens=60, max_retries=0)
    message = llm.bind_tools([Weather], tool_choice="any").invoke("What's the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    jsonschema.validate(message.tool_calls[0]["args"], Weather.model_json_schema())
    for method in ("json_schema", "function_calling"):
        out = llm.with_structured_output(Capital, method=method).invoke("What is the capital of France?")
        assert isinstance(out, Capital), method
        jsonschema.validate(out.model_dump(), Capital.model_json_schema())


def test_pydantic_ai_agent_with_an_output_type(server, model_id):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(model_id, provider=OpenAIProvider(base_url=server + "/v1", api_key=ADMIN_KEY))
    agent = Agent(model, output_type=Capital, model_settings={"temperature": 0, "max_tokens": 80})
    result = agent.run_sync("What is the capital of France?")
    assert isinstance(result.output, Capital)
    jsonschema.validate(result.output.model_dump(), Capital.model_json_schema())


class Report(BaseModel):
    city: str = Field(max_length=30)
    summary: str = Field(max_length=80)


def test_openai_agents_sdk_calls_a_tool_and_returns_an_output_type(server, model_id):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # it would export traces to OpenAI's servers
    calls = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is 21 degrees and sunny in {city}."

    model = OpenAIChatCompletionsModel(model=model_id, openai_client=openai.AsyncOpenAI(base_url=server + "/v1", api_key=ADMIN_KEY,
                                                                                         max_retries=0))
    # A 135M model would call its tool forever: the tool's answer ends the run, which proves the call.
    caller = Agent(name="weather", instructions="Use the get_weather tool.", tools=[get_weather], model=model,
                   model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60), tool_use_behavior="stop_on_first_tool")
    result = Runner.run_sync(caller, "What's the weather in Paris?", max_turns=2)
    assert calls and result.final_output == f"It is 21 degrees and sunny in {calls[0]}."
    reporter = Agent(name="reporter", instructions="Report the weather.", output_type=Report, model=model,
                     model_settings=ModelSettings(temperature=0, max_tokens=80))
    report = Runner.run_sync(reporter, f"The weather: {result.final_output}", max_turns=1).final_output
    assert isinstance(report, Report)
    jsonschema.validate(report.model_dump(), Report.model_json_schema())
