"""The swarm over libp2p, with real processes on loopback: an Oracle and Scouts that find it
(bootstrap address or DHT), get spans assigned, download their shards from it, serve them, survive
a Scout's SIGKILL mid-stream, and come back after the Oracle restarts."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import openai
import pytest

from oracle.swarm.local_scouts import LocalScout

from .conftest import ADMIN_KEY, OracleProcess, ScoutSwarm, free_port, same_or_tied_tokens
from .test_structured import PERSON, WEATHER

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain."]
POEM = dict(messages=[{"role": "user", "content": "Write a short poem about the sea."}], temperature=0, max_tokens=40)


def answers(url: str, model_id: str) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    return [c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=24)
            .choices[0].message.content for p in PROMPTS]


def serving(status: dict) -> list[dict]:
    return [s for s in status["scouts"] if s["state"] in ("active", "spare")]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = ScoutSwarm(tmp_path_factory.mktemp("swarm"), "--blocks-per-scout", "15", "--dead-after", "2")
    try:
        yield s
    finally:
        s.stop()


def test_scouts_join_get_spans_and_answer_like_one_process(swarm, server, model_id):
    scout_port = free_port()
    swarm.add("a", "--p2p-port", str(scout_port))
    swarm.add("b", bootstrap=None)  # it learns the Oracle's address from /swarm
    status = swarm.oracle.wait_for("two serving Scouts", lambda st: len(serving(st)) == 2 and st)
    assert sorted(tuple(s["span"]) for s in serving(status)) == [(0, 15), (15, 30)]
    assert status["coverage"] == [1] * 30
    for s in serving(status):
        assert s["announced_state"] == "serving" and s["assigned_span"] == s["span"] and s["p2p_connected"]
        assert s["throughput"] > 0 and s["memory_bytes"] > 0 and s["heartbeat_age_s"] < 2
    assert answers(swarm.oracle.url, model_id) == answers(server, model_id)
    log = open(swarm.scouts["a"].log_path).read()
    assert "downloading shards" in log or "serving blocks" in log  # fetched from the Oracle's /shards


def test_schemas_and_tool_calls_through_the_scouts_match_one_process(swarm, server, model_id):
    """Grammar masks live on the Oracle: through two Scouts (speculating, as by default) the
    constrained answers are the ones a single process gives, and valid."""
    requests = [
        dict(messages=[{"role": "user", "content": "Invent a person."}], response_format={
            "type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}),
        dict(messages=[{"role": "user", "content": "What's the weather in Paris?"}], tools=[WEATHER], tool_choice="required"),
    ]
    for request in requests:
        routed, local = [openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0).chat.completions.create(
            model=model_id, temperature=0, max_tokens=80, logprobs=True, top_logprobs=2, **request).choices[0]
            for url in (swarm.oracle.url, server)]
        if same_or_tied_tokens(routed.logprobs.content, local.logprobs.content):  # a near-tie may flip (see the helper)
            calls = [[(c.function.name, c.function.arguments) for c in a.message.tool_calls or []] for a in (routed, local)]
            assert routed.message.content == local.message.content and calls[0] == calls[1]
        for answer in (routed, local):
            if "tools" in request:
                assert answer.finish_reason == "tool_calls"
                jsonschema.validate(json.loads(answer.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
            else:
                assert answer.finish_reason == "stop"
                jsonschema.validate(json.loads(answer.message.content), PERSON)


def test_embeddings_through_the_scouts_match_one_process(swarm, server, model_id):
    texts = ["The cat sat on the mat.", "Quarterly revenue grew by eight percent."]
    routed, local = [np.array([d.embedding for d in openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
                               .embeddings.create(model=model_id, input=texts, encoding_format="float").data])
                     for url in (swarm.oracle.url, server)]
    assert routed.shape == local.shape == (2, 576)
    assert (routed * local).sum(axis=1).min() > 0.9999


def test_a_scout_finds_the_oracle_through_the_dht_and_becomes_a_replica(swarm):
    """The third Scout is told only Scout a's address."""
    a = swarm.scouts["a"]
    a_p2p = next(line.split("libp2p: ", 1)[1].strip() for line in open(a.log_path) if "libp2p: " in line)
    c = swarm.add("c", bootstrap=a_p2p)
    status = swarm.oracle.wait_for("a third serving Scout", lambda st: len(serving(st)) == 3 and st, timeout=90)
    assert sorted(status["coverage"]) == [1] * 15 + [2] * 15  # one span replicated
    mine = next(s for s in status["scouts"] if s["peer_id"] == c.address.peer_id)
    assert tuple(mine["span"]) in [(0, 15), (15, 30)]
    assert "through the DHT" in open(c.log_path).read()


def test_killing_the_scout_a_stream_runs_through_keeps_the_output(swarm, server, model_id):
    expected = openai.OpenAI(base_url=server + "/v1", api_key=ADMIN_KEY).chat.completions.create(
        model=model_id, logprobs=True, top_logprobs=2, **POEM)
    c = openai.OpenAI(base_url=swarm.oracle.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    replicated = swarm.oracle.wait_for("a replicated span", lambda st: [tuple(s["span"]) for s in serving(st)
                                                                          if st["coverage"][s["span"][0]] == 2])[0]
    tokens, killed = [], None
    for i, chunk in enumerate(c.chat.completions.create(model=model_id, stream=True, logprobs=True, top_logprobs=2, **POEM)):
        if chunk.choices and chunk.choices[0].logprobs:
            tokens += chunk.choices[0].logprobs.content
        if i == 5:
            carrier = next(s for s in swarm.oracle.status()["scouts"] if tuple(s["span"] or ()) == replicated and s["sessions"] > 0)
            killed = next(s for s in swarm.scouts.values() if s.address.peer_id == carrier["peer_id"])
            killed.proc.kill()
    # The replayed caches are bit-exact; only a near-tie may flip where a Scout batched this session with other work.
    same_or_tied_tokens(tokens, expected.choices[0].logprobs.content)
    status = swarm.oracle.wait_for("the dead Scout", lambda st: any(s["peer_id"] == killed.address.peer_id and s["state"] == "dead"
                                                                    for s in st["scouts"]) and st)
    assert status["failovers"] >= 1 and status["coverage"] == [1] * 30
    killed.stop()


def test_scouts_come_back_to_a_restarted_oracle(swarm, server, model_id):
    before = {s["peer_id"]: s["span"] for s in serving(swarm.oracle.status())}
    swarm.restart_oracle()
    status = swarm.oracle.wait_for("the Scouts to return", lambda st: len(serving(st)) == len(before) and st, timeout=90)
    assert {s["peer_id"]: s["span"] for s in serving(status)} == before  # adopted as they were, nothing reloaded
    assert answers(swarm.oracle.url, model_id)[:1] == answers(server, model_id)[:1]


def test_a_scout_finds_the_oracle_on_the_lan_with_mdns(tmp_path):
    """No bootstrap address at all: mDNS on this machine's network finds the Oracle. Without a
    span limit the only Scout is assigned every block its memory holds (all 30 here)."""
    (tmp_path / "oracle").mkdir()
    oracle = OracleProcess(tmp_path / "oracle", "--swarm", "--mdns", ready=False)
    scout = None
    try:
        scout = LocalScout(None, tmp_path / "scout", ["--mdns", "--threads", "1", "--heartbeat", "0.5"])
        status = oracle.wait_for("the Scout found by mDNS", lambda st: serving(st) and st, timeout=90)
        assert serving(status)[0]["peer_id"] == scout.address.peer_id and status["coverage"] == [1] * 30
    finally:
        oracle.stop()
        if scout is not None:
            scout.stop()
