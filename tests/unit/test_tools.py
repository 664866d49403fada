"""Tool calling, piece by piece: the request's tools and tool_choice, tool turns as prompt text,
calls read back from text, and the streaming splitter that keeps call markup out of content."""

from __future__ import annotations

import json
import random

import pytest

from oracle.api.errors import APIError
from oracle.api.schemas import ChatMessage
from oracle.api.tools import CLOSE, OPEN, CallStream, ToolSet, call_id, parse_calls, render_messages

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def toolset(tools=(WEATHER, TIME), choice=None, parallel=None, functions=None, function_call=None):
    return ToolSet.from_request(list(tools) if tools is not None else None, choice, functions, function_call, parallel)


@pytest.mark.parametrize("choice, mode, forced", [
    (None, "auto", None), ("auto", "auto", None), ("none", "none", None), ("required", "required", None),
    ({"type": "function", "function": {"name": "get_time"}}, "named", "get_time"),
])
def test_tool_choice_modes(choice, mode, forced):
    t = toolset(choice=choice)
    assert (t.mode, t.forced) == (mode, forced)


@pytest.mark.parametrize("tools, choice, param", [
    ([{"type": "web_search"}], None, "tools[0].type"),
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "tools[0].function.name"),
    ([WEATHER, WEATHER], None, "tools"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ([WEATHER], "sometimes", "tool_choice"),
    ([], "required", "tool_choice"),
])
def test_bad_tools_are_400s_naming_the_field(tools, choice, param):
    with pytest.raises(APIError) as e:
        toolset(tools, choice)
    assert e.value.status == 400 and e.value.param == param


def test_no_tools_means_no_toolset():
    assert toolset(tools=None) is None and toolset(tools=[]) is None


def test_calls_schema_follows_parallel_and_named():
    assert "maxItems" not in toolset().calls_schema()
    assert toolset(parallel=False).calls_schema()["maxItems"] == 1
    named = toolset(choice={"type": "function", "function": {"name": "get_weather"}}).calls_schema()
    assert named["maxItems"] == 1 and named["items"]["properties"]["name"] == {"const": "get_weather"}


def test_legacy_functions():
    t = toolset(tools=None, functions=[WEATHER["function"]], function_call={"name": "get_weather"})
    assert t.legacy and (t.mode, t.forced) == ("named", "get_weather") and not t.parallel


def test_tool_turns_become_prompt_text():
    messages = [
        ChatMessage(role="user", content="Weather in Paris and Rome?"),
        ChatMessage(role="assistant", content=None, tool_calls=[
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]),
        ChatMessage(role="tool", tool_call_id="call_1", content="21 C"),
        ChatMessage(role="tool", tool_call_id="call_2", content="25 C"),
    ]
    out = render_messages(messages, toolset())
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert "get_weather" in out[0]["content"] and OPEN in out[0]["content"]
    assert json.loads(out[2]["content"].removeprefix(OPEN).removesuffix(CLOSE)) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]
    assert "21 C" in out[3]["content"] and "25 C" in out[3]["content"] and "call_2" in out[3]["content"]
    assert '"name": "get_weather"' in out[3]["content"]  # the result names the function its call asked for
    # A system message is extended, not duplicated; with tool_choice none the tools are not offered.
    with_system = render_messages([ChatMessage(role="system", content="Be brief."), *messages[:1]], toolset())
    assert len(with_system) == 2 and with_system[0]["content"].startswith("Be brief.")
    assert render_messages(messages[:1], toolset(choice="none")) == [{"role": "user", "content": "Weather in Paris and Rome?"}]


def test_parse_calls():
    text = f'Checking. {OPEN}[{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}]{CLOSE}'
    content, calls = parse_calls(text, "chatcmpl-1", 0)
    assert content == "Checking." and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id == call_id("chatcmpl-1", 0, 0) != call_id("chatcmpl-1", 1, 0)
    assert parse_calls("no calls here", "x", 0) == ("no calls here", [])
    cut = f'{OPEN}[{{"name": "get_weather", "argu'
    tricky = f'{OPEN}[{{"name": "get_weather", "arguments": {{"city": "a}}]{CLOSE} b"}}}}]{CLOSE}'
    assert json.loads(parse_calls(tricky, "x", 0)[1][0].arguments) == {"city": f"a}}]{CLOSE} b"}
    assert parse_calls(cut, "x", 0) == (cut, [])  # cut short by max_tokens: left as text


def reassemble(text: str, rng: random.Random) -> tuple[str, dict]:
    stream = CallStream("chatcmpl-1", 0)
    content, calls, i = "", {}, 0
    while i < len(text):
        j = i + rng.randint(1, 7)
        piece, deltas = stream.feed(text[i:j])
        content += piece
        for d in deltas:
            if "id" in d:
                assert d["index"] not in calls and d["type"] == "function" and d["function"]["arguments"] == ""
                calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                calls[d["index"]]["arguments"] += d["function"]["arguments"]
        i = j
    return content + stream.flush(), calls


def test_streamed_calls_reassemble_to_the_parsed_ones():
    text = (f'Let me look that up {OPEN}[{{"name": "get_weather", "arguments": {{"city": "Pa\\"ris}}", "days": [1, {{"x": 2}}]}}}}, '
            f'{{"name": "get_time", "arguments": {{}}}}]{CLOSE}')
    expected_content, expected = parse_calls(text, "chatcmpl-1", 0)
    rng = random.Random(0)
    for _ in range(100):
        content, calls = reassemble(text, rng)
        assert content.strip() == expected_content and OPEN[:2] not in content
        assert [(calls[i]["id"], calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == \
            [(c.id, c.name, json.loads(c.arguments)) for c in expected]


def test_text_that_only_looks_like_a_call_is_content():
    rng = random.Random(1)
    for text in ["a <tool_ca b", "x < y and <tool", "<tool_call"]:
        assert reassemble(text, rng) == (text, {})
