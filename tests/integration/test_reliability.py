"""Faults under load with real processes: Scouts killed and restarted while clients run, Scouts
that stop answering, clients that hang up mid-stream, an Oracle restart that must lose nothing.
(bench/chaos.py runs the same faults longer and measures them.)"""

from __future__ import annotations

import time

import openai
import pytest
import requests

from bench.chaos import Chaos, Load
from oracle.swarm.local_scouts import LocalScout

from .conftest import ADMIN_KEY, OracleProcess, ScoutSwarm, client, create_key

FOUR = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Four Scouts of 15 blocks each: every span served twice."""
    s = ScoutSwarm(tmp_path_factory.mktemp("chaos"), "--blocks-per-scout", "15", "--dead-after", "2", "--hop-timeout", "5")
    try:
        for name in FOUR:
            s.add(name)
        s.oracle.wait_for("every span served twice", lambda st: min(st["coverage"]) == 2, timeout=120)
        yield s
    finally:
        s.stop()


def test_killing_random_scouts_under_load_fails_no_request_and_changes_no_answer(swarm, model_id):
    load = Load(swarm.oracle.url, ADMIN_KEY, model_id, clients=2, max_tokens=16)
    # The expected answers come from the same swarm before any fault.
    for prompt in ("What is the capital of France?", "Name three colors."):
        load.expected[prompt] = load.ask(client(swarm.oracle.url, ADMIN_KEY), prompt, stream=False)[0]
    def carrying_a_session(up: list[str]) -> list[str]:
        status = swarm.oracle.status()
        return [n for n in up if (s := swarm.scout(n, status)) and s["sessions"] > 0]

    # Kills aim at Scouts carrying a session, so the failover path is exercised every run, not by luck.
    chaos = Chaos(list(FOUR), lambda n: swarm.scouts[n].proc.kill(), lambda n: swarm.add(n), every=6, down=2, seed=1,
                  ready=lambda: min(swarm.oracle.status()["coverage"]) == 2, candidates=carrying_a_session)
    load.start()
    chaos.start()
    deadline = time.monotonic() + 120
    while len(chaos.kills) < 3 and time.monotonic() < deadline:
        time.sleep(1)
    chaos.stop()
    records = load.stop()
    assert len(chaos.kills) >= 3
    assert len(records) >= 8
    assert [r["error"] for r in records if not r["ok"]] == []
    assert [r["prompt"] for r in records if r["ok"] and not r["same"]] == []
    status = swarm.oracle.wait_for("every span served twice again", lambda st: min(st["coverage"]) == 2 and st, timeout=180)
    assert status["failovers"] >= 1


def test_a_client_that_hangs_up_mid_stream_frees_its_caches_on_every_scout(swarm, model_id):
    def on_scouts(st: dict) -> int:
        return sum(s.get("sessions_on_scout") or 0 for s in st["scouts"] if s["state"] in ("active", "spare"))

    c = client(swarm.oracle.url, ADMIN_KEY)
    stream = c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Count to one thousand."}],
                                       max_tokens=2000, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert swarm.oracle.wait_for("the session's caches on the Scouts", lambda st: on_scouts(st) >= 2, timeout=10)
    stream.close()
    swarm.oracle.wait_for("every Scout to free the session", lambda st: st["sessions"] == 0 and on_scouts(st) == 0 and st,
                          timeout=30)
    assert requests.get(swarm.oracle.url + "/health", timeout=5).json()["running_sequences"] == 0


def test_an_oracle_restart_keeps_completions_responses_keys_and_limits_and_the_scouts_return(swarm, model_id):
    data_dir = swarm.root / "oracle"
    key = create_key("limited", "--rpm", "2", data_dir=data_dir)
    user = client(swarm.oracle.url, key)
    question = dict(model=model_id, messages=[{"role": "user", "content": "Name three colors."}], temperature=0, max_tokens=8)
    mine = user.chat.completions.create(**question, store=True)
    admins = client(swarm.oracle.url, ADMIN_KEY).chat.completions.create(**question, store=True)
    response = user.responses.create(model=model_id, input="Name three colors.", temperature=0, max_output_tokens=8)
    with pytest.raises(openai.RateLimitError):
        user.models.list()
    swarm.restart_oracle()
    user = client(swarm.oracle.url, key)
    with pytest.raises(openai.RateLimitError):  # the limit's window lives in Redis, not in the process
        user.models.list()
    admin = client(swarm.oracle.url, ADMIN_KEY)
    assert admin.chat.completions.retrieve(mine.id).choices[0].message.content == mine.choices[0].message.content
    assert admin.chat.completions.retrieve(admins.id).id == admins.id
    assert admin.responses.retrieve(response.id).output_text == response.output_text  # responses live in Redis too
    swarm.oracle.wait_for("the Scouts to return", lambda st: min(st["coverage"]) == 2, timeout=120)
    # Once its minute is over the key works again, and sees only its own completions.
    assert patiently(lambda: user.chat.completions.retrieve(mine.id)).id == mine.id
    with pytest.raises(openai.NotFoundError):
        patiently(lambda: user.chat.completions.retrieve(admins.id))


def patiently(call, timeout: float = 130.0):
    """``call()``, retried while the key is over its rate limit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(2)


def test_scouts_that_never_answer_or_answer_too_late_are_timed_out_and_routed_around(tmp_path_factory, tmp_path, server, model_id):
    made = []
    try:
        for name, faults in (("hung", ["--inject-faults", "hang=1"]), ("slow", ["--inject-faults", "delay_ms=6000"]), ("good", [])):
            made.append(LocalScout((0, 30), tmp_path_factory.mktemp(name), ["--threads", "1", *faults], wait=False))
        for s in made:
            s.wait()
        hung, slow, good = made
        # Listed first, the broken Scouts win the routing ties: the first request meets both.
        oracle = OracleProcess(tmp_path, "--scouts", ",".join(str(s.address) for s in made), "--hop-timeout", "2",
                               "--no-audits")
        try:
            question = dict(model=model_id, messages=[{"role": "user", "content": "What is the capital of France?"}],
                            temperature=0, max_tokens=12)
            expected = client(server, ADMIN_KEY).chat.completions.create(**question).choices[0].message.content
            c = client(oracle.url, ADMIN_KEY)
            assert [c.chat.completions.create(**question).choices[0].message.content for _ in range(3)] == [expected] * 3
            log = open(oracle.log_path).read()
            for s in (hung, slow):
                assert f"Scout {s.address.peer_id} stopped answering" in log
            status = {s["peer_id"]: s for s in oracle.status()["scouts"]}
            assert status[good.address.peer_id]["forwards"] > 0
            assert any(status[s.address.peer_id]["cooldown_s"] for s in (hung, slow)), status
        finally:
            oracle.stop()
    finally:
        for s in made:
            s.stop()
