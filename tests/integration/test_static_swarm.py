"""Oracle + two Scout processes on loopback over the TLS data plane (Scouts given by address)."""

from __future__ import annotations

import time

import openai
import requests
import pytest

from oracle.swarm.local_scouts import LocalScout
from shard_common.identity import Identity

from .conftest import ADMIN_KEY, OracleProcess, free_port, greedy_answers, static_scouts, stream_killing_the_carrier

PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def scouts(tmp_path_factory):
    yield from static_scouts(tmp_path_factory, ((0, 11), (11, 30)))


def answers(url: str, model_id: str) -> list[str]:
    return greedy_answers(url, model_id, PROMPTS, 24)


def test_swarm_output_identical_to_single_process(scouts, server, model_id, tmp_path):
    swarm = OracleProcess(tmp_path, "--scouts", ",".join(str(s.address) for s in scouts))
    try:
        assert answers(swarm.url, model_id) == answers(server, model_id)
        c = openai.OpenAI(base_url=swarm.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": PROMPTS[0]}], temperature=0, max_tokens=24, stream=True) if ch.choices)
        assert "Paris" in streamed
        three = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Say a word."}], n=3,
                                          temperature=1.0, seed=9, max_tokens=6)
        assert len(three.choices) == 3  # n > 1 forks the prompt's caches on every Scout
    finally:
        swarm.stop()


def no_route_error(oracle: OracleProcess, model_id: str) -> dict:
    assert requests.get(oracle.url + "/health", timeout=5).json()["status"] == "no_route"
    c = openai.OpenAI(base_url=oracle.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(openai.InternalServerError) as e:
        c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert e.value.status_code == 503
    return e.value.body


def test_oracle_refuses_a_scout_with_the_wrong_identity(scouts, tmp_path, model_id):
    real, other = scouts
    forged = f"{Identity.generate().peer_id}@{real.address.host}:{real.address.port}"  # right address, someone else's peer id
    oracle = OracleProcess(tmp_path, "--scouts", forged + "," + str(other.address), ready=False)
    try:
        assert no_route_error(oracle, model_id)["code"] == "no_route"
        assert "not the expected" in open(oracle.log_path).read()
    finally:
        oracle.stop()


def test_uncovered_blocks_answer_no_route(scouts, tmp_path, model_id):
    oracle = OracleProcess(tmp_path, "--scouts", str(scouts[1].address), ready=False)
    try:
        assert "no Scout serves block 0" in no_route_error(oracle, model_id)["message"]
    finally:
        oracle.stop()


def test_killing_a_scout_mid_stream_fails_over_to_a_replica(tmp_path_factory, server, model_id, tmp_path):
    """SIGKILL the Scout serving the second hop while a stream is running: a replica takes over,
    the session is replayed into it, and the client gets the same tokens without an error."""
    made = []
    try:
        for span in ((0, 11), (11, 30), (11, 30)):
            made.append(LocalScout(span, tmp_path_factory.mktemp("fo")))
        swarm = OracleProcess(tmp_path, "--scouts", ",".join(str(s.address) for s in made))
        try:
            # SIGKILL the replica this session is routed through, mid-stream.
            streamed, expected, _ = stream_killing_the_carrier(swarm, made, (11, 30), server, model_id, 40)
            assert streamed == expected
            assert "failed: route" in open(swarm.log_path).read()
        finally:
            swarm.stop()
    finally:
        for s in made:
            s.stop()


def test_local_scouts_demo_and_cluster_status(tmp_path, server, model_id):
    """`serve --local-scouts 2`: the Oracle starts and places its own Scouts."""
    swarm = OracleProcess(tmp_path, "--local-scouts", "2")
    try:
        assert answers(swarm.url, model_id)[:1] == answers(server, model_id)[:1]
        status = requests.get(swarm.url + "/v1/cluster/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
        assert status["mode"] == "swarm" and status["coverage"] == [1] * 30
        assert sorted(tuple(s["span"]) for s in status["scouts"]) == [(0, 15), (15, 30)]
        assert all(s["state"] == "active" and s["requests"] > 0 for s in status["scouts"])
        local = requests.get(server + "/cluster/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
        assert local["mode"] == "local" and local["coverage"] == [1] * 30
    finally:
        swarm.stop()
    assert "assigned blocks [15, 30)" in open(swarm.log_path).read()


def test_a_returning_scout_rejoins_as_a_spare_and_takes_over(tmp_path_factory, server, model_id, tmp_path):
    made = []
    try:
        port = free_port()
        spare_dir = tmp_path_factory.mktemp("spare")
        made = [LocalScout((0, 11), tmp_path_factory.mktemp("a")), LocalScout((11, 30), tmp_path_factory.mktemp("b")),
                LocalScout((11, 30), spare_dir, ["--data-port", str(port)])]
        swarm = OracleProcess(tmp_path, "--scouts", ",".join(str(s.address) for s in made))
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

        def spare_state():
            scouts = requests.get(swarm.url + "/v1/cluster/status", headers=headers, timeout=10).json()["scouts"]
            return [s["state"] for s in scouts if s["peer_id"] == made[2].address.peer_id][-1]

        def wait_for(*states):
            deadline = time.monotonic() + 30
            while spare_state() not in states and time.monotonic() < deadline:
                time.sleep(0.3)
            assert spare_state() in states

        alive = ("spare", "active")  # a replica is "active" when new sessions would be routed through it

        try:
            wait_for(*alive)
            made[2].proc.kill()
            wait_for("dead")
            made[2].stop()
            made[2] = LocalScout((11, 30), spare_dir, ["--data-port", str(port)])  # same identity, same address
            wait_for(*alive)
            made[1].proc.kill()  # the other replica: the returned Scout takes over
            assert answers(swarm.url, model_id) == answers(server, model_id)
        finally:
            swarm.stop()
    finally:
        for s in made:
            s.stop()


def test_fallback_local_computes_uncovered_blocks(scouts, server, model_id, tmp_path):
    """Only blocks 11..30 have a Scout; with --fallback-local the Oracle runs 0..11 itself."""
    oracle = OracleProcess(tmp_path, "--scouts", str(scouts[1].address), "--fallback-local")
    try:
        assert answers(oracle.url, model_id) == answers(server, model_id)
        status = requests.get(oracle.url + "/v1/cluster/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()
        assert status["local_spans"] == [[0, 11]] and status["chain"][0] == "oracle-local"
    finally:
        oracle.stop()
