"""Raw HTTP for the error cases: every failure is an OpenAI error body, never a crash."""

from __future__ import annotations

import json
import os
import threading
import time

import requests

from .conftest import ADMIN_KEY, create_key

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def post(server, path, body=None, raw=None, **kw):
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(server + path, data=data, headers={"Content-Type": "application/json", **AUTH}, timeout=60, **kw)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def chat(model_id, **kw):
    return {"model": model_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **kw}


def test_malformed_json(server):
    assert_error(post(server, "/v1/chat/completions", raw=b"{not json"), 400, "invalid_json")
    assert_error(post(server, "/v1/chat/completions", raw=b"[1, 2]"), 400, "invalid_json")
    assert_error(post(server, "/v1/chat/completions", raw=b"\xff\xfe{}"), 400, "invalid_json")
    assert_error(post(server, "/v1/chat/completions", raw=b"[" * 100000 + b"]" * 100000), 400)


def test_wrong_types_and_ranges(server, model_id):
    assert_error(post(server, "/v1/chat/completions", chat(model_id, temperature=3)), 400, "invalid_value", "temperature")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, temperature="hot")), 400, param="temperature")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, top_logprobs=21, logprobs=True)), 400, param="top_logprobs")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, stop=["a", "b", "c", "d", "e"])), 400, param="stop")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, logit_bias={"99999999": 1})), 400, param="logit_bias")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, max_tokens=0)), 400, param="max_tokens")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, speculative="maybe")), 400, param="speculative")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, n=10000)), 400, param="n")
    assert_error(post(server, "/v1/chat/completions", {"model": model_id}), 400, "missing_required_parameter", "messages")
    assert_error(post(server, "/v1/chat/completions", {"model": model_id, "messages": []}), 400, param="messages")
    assert_error(post(server, "/v1/chat/completions", {"model": model_id, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}
    assert_error(post(server, "/v1/chat/completions", {"model": model_id, "messages": [image]}), 400)


def test_unknown_model(server):
    assert_error(post(server, "/v1/chat/completions", chat("gpt-4")), 404, "model_not_found", "model")
    assert_error(post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"}), 404, "model_not_found")


def test_unsupported_fields_are_rejected_not_dropped(server, model_id):
    for field, value in [("audio", {"voice": "alloy"}), ("modalities", ["audio"]), ("prediction", {"type": "content", "content": "x"})]:
        assert_error(post(server, "/v1/chat/completions", chat(model_id, **{field: value})), 400, "unsupported_parameter", field)
    assert_error(post(server, "/v1/chat/completions", chat(model_id, tools=[{"type": "web_search"}])), 400,
                 "unsupported_parameter", "tools[0].type")
    assert_error(post(server, "/v1/completions", {"model": model_id, "prompt": "x", "suffix": "y"}), 400, "unsupported_parameter", "suffix")
    # Unknown fields are ignored.
    assert post(server, "/v1/chat/completions", chat(model_id, some_future_field=1)).status_code == 200


def test_context_length_exceeded(server, model_id):
    long = "word " * 9000
    err = assert_error(post(server, "/v1/chat/completions", {"model": model_id, "messages": [{"role": "user", "content": long}]}), 400, "context_length_exceeded")
    assert "8192" in err["message"]
    err = assert_error(post(server, "/v1/chat/completions", chat(model_id, max_tokens=9000)), 400, "context_length_exceeded")


def test_body_too_large(server, model_id):
    big = chat(model_id, messages=[{"role": "user", "content": "x" * (2 << 20)}])
    assert_error(post(server, "/v1/chat/completions", big), 413, "request_too_large")


def test_unknown_route_and_method(server):
    assert_error(requests.get(server + "/v1/nothing-here", timeout=5, headers=AUTH), 404, "not_found")
    assert_error(requests.delete(server + "/v1/models", timeout=5, headers=AUTH), 405)


def test_health_and_openapi(server):
    h = requests.get(server + "/health", timeout=5).json()
    assert h["ready"] is True and h["status"] == "ok"
    doc = requests.get(server + "/openapi.json", timeout=5).json()
    for path in ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "/health"):
        assert path in doc["paths"], path
    schemas = doc["components"]["schemas"]
    assert "ChatCompletionRequest" in schemas and "temperature" in schemas["ChatCompletionRequest"]["properties"]


def test_client_disconnect_frees_slot_and_server_survives(server, model_id):
    body = chat(model_id, max_tokens=2000, stream=True, messages=[{"role": "user", "content": "Count to one thousand."}], ignore_eos=True)
    with requests.post(server + "/v1/chat/completions", json=body, stream=True, timeout=60, headers=AUTH) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    # The generation stops and its batch slot is freed; the server keeps answering.
    deadline = time.monotonic() + 20
    while requests.get(server + "/health", timeout=5).json()["running_sequences"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert requests.get(server + "/health", timeout=5).json()["running_sequences"] == 0
    ok = post(server, "/v1/chat/completions", chat(model_id, temperature=0))
    assert ok.status_code == 200


def test_many_bad_requests_in_parallel_do_not_kill_the_server(server, model_id):
    bodies = [b"", b"null", b"{}", b'{"model": 1}', b'{"messages": "x"}', b'{"model": "m", "messages": [{"role": "user"}]}'] * 5
    errors = []

    def send(raw):
        try:
            r = post(server, "/v1/chat/completions", raw=raw)
            if r.status_code >= 500:
                errors.append(r.text)
        except requests.RequestException as e:
            errors.append(str(e))

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert requests.get(server + "/health", timeout=5).status_code == 200


def test_hostile_bodies_are_bounded_and_answered_with_400_or_413(server, model_id):
    path = "/v1/chat/completions"
    assert_error(post(server, path, chat(model_id, stop=[f"s{i}" for i in range(5000)])), 400, param="stop")
    assert_error(post(server, path, chat(model_id, logit_bias={str(i): 1 for i in range(5000)})), 400, param="logit_bias")
    assert_error(post(server, path, chat(model_id, max_tokens=10**12)), 400, "context_length_exceeded")
    assert_error(post(server, path, raw=f'{{"model": "{model_id}", "messages": [], "max_tokens": 1e999}}'.encode()), 400)
    assert_error(post(server, path, chat(model_id, n=10**30)), 400, param="n")
    nested = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": ' + b"[" * 200000 + b"]" * 200000 + b"}"
    assert_error(post(server, path, raw=nested), 400, "invalid_json")
    assert_error(post(server, path, raw=b'{"model": "\xff\xfe", "messages": []}'), 400, "invalid_json")
    # Valid JSON, but an unpaired surrogate escape is not text: refused, not a tokenizer crash.
    lone = b'{"model": "' + model_id.encode() + b'", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert_error(post(server, path, raw=lone), 400, "invalid_json")
    paired = lone.replace(b"\\ud800", b"\\ud83d\\ude00")  # an escaped emoji is fine
    assert post(server, path, raw=paired).status_code == 200

    def chunks():  # no Content-Length: the limit still holds while reading
        for _ in range(40):
            yield b"x" * 65536

    r = requests.post(server + path, data=chunks(), headers={"Content-Type": "application/json", **AUTH}, timeout=60)
    assert_error(r, 413, "request_too_large")
    assert requests.get(server + "/health", timeout=5).json()["ready"] is True


def test_operator_routes_need_the_admin_key(server, oracle):
    user = {"Authorization": f"Bearer {create_key('not-an-admin', data_dir=os.path.dirname(oracle.log_path))}"}
    for method, path in [("GET", "/v1/cluster/status"), ("GET", "/v1/scouts"), ("GET", "/v1/scouts/bans"),
                         ("GET", "/v1/scouts/12D3KooWx"), ("POST", "/v1/scouts/12D3KooWx/unban"),
                         ("POST", "/v1/scouts/12D3KooWx/reset"), ("GET", "/metrics")]:
        assert_error(requests.request(method, server + path, headers=user, timeout=10), 403, "admin_required")
        assert_error(requests.request(method, server + path, timeout=10), 401, "invalid_api_key")
    assert requests.get(server + "/dashboard", params={"key": "sk-oracle-wrong-" + "w" * 32}, timeout=10).status_code == 401


def test_bad_schemas_grammars_and_tools_are_400s_with_the_reason(server, model_id):
    def schema(value, strict=True):
        return {"type": "json_schema", "json_schema": {"name": "x", "schema": value, "strict": strict}}

    err = assert_error(post(server, "/v1/chat/completions", chat(model_id, response_format=schema({"type": "strang"}))), 400,
                       "invalid_value", "response_format")
    assert "strang" in err["message"]
    assert_error(post(server, "/v1/chat/completions", chat(model_id, response_format={"type": "yaml"})), 400, param="response_format.type")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, response_format={"type": "json_schema"})), 400,
                 param="response_format.json_schema")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, structured_outputs={"regex": "(unclosed"})), 400,
                 "invalid_value", "structured_outputs.regex")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, grammar="root ::= (")), 400, "invalid_value", "grammar")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strang"}}}}}
    assert_error(post(server, "/v1/chat/completions", chat(model_id, tools=[tool], tool_choice="required")), 400, "invalid_value", "tools")
    assert_error(post(server, "/v1/chat/completions", chat(model_id, tool_choice="required")), 400, param="tool_choice")
    unimplemented_tool = {"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "not": {"const": "b"}}}}}}
    assert_error(post(server, "/v1/chat/completions", chat(model_id, tools=[unimplemented_tool], tool_choice="required")), 400,
                 "invalid_value", "tools")
    unimplemented_tool["function"]["strict"] = False
    r = post(server, "/v1/chat/completions", chat(model_id, tools=[unimplemented_tool], tool_choice="required", max_tokens=2))
    assert r.status_code == 200, r.text
    # A keyword the library does not implement: strict says so; not strict, it is ignored and the rest still constrains.
    unimplemented = {"type": "object", "properties": {"a": {"type": "string", "not": {"const": "b"}}}}
    err = assert_error(post(server, "/v1/chat/completions", chat(model_id, response_format=schema(unimplemented))), 400,
                       "invalid_value", "response_format")
    assert "not" in err["message"]
    r = post(server, "/v1/chat/completions", chat(model_id, response_format=schema(unimplemented, strict=False), max_tokens=2))
    assert r.status_code == 200, r.text
