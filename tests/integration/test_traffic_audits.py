"""Audits of real traffic with real processes: a Scout that lies rarely, alone on its blocks, is
caught by the Oracle following its sessions (golden tickets off) before a wrong answer reaches a
client; the answers a Scout computed before it failed a check are marked in storage; and the
plausibility checks never trip on honest Scouts of every backend here."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import requests

from .conftest import ADMIN_KEY, ScoutSwarm

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is two plus two?", "Who wrote Hamlet?"]


def ask(url: str, model_id: str, question: str, max_tokens: int = 16, **extra) -> openai.types.chat.ChatCompletion:
    c = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    return c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": question}], temperature=0,
                                     max_tokens=max_tokens, extra_body={"speculative": "off"}, **extra)


def admin(swarm: ScoutSwarm, path: str) -> dict:
    r = requests.get(swarm.oracle.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def honest_answers(server, model_id):
    return {q: ask(server, model_id, q).choices[0].message.content for q in QUESTIONS}


def sole_liar_swarm(root, faults: str, *oracle_args: str) -> ScoutSwarm:
    """An honest Scout on blocks 0..15, then a liar that alone serves blocks 15..30."""
    swarm = ScoutSwarm(root, "--blocks-per-scout", "15", "--dead-after", "2", "--fallback-local", *oracle_args)
    swarm.add("first")
    swarm.oracle.wait_for("the first Scout on 0..15", lambda st: (s := swarm.scout("first", st)) and s["span"] == [0, 15])
    swarm.add("liar", "--inject-faults", faults)
    swarm.oracle.wait_for("the liar serving", lambda st: (s := swarm.scout("liar", st)) and s["span"] == [15, 30]
                          and s["state"] in ("active", "spare"))
    return swarm


def test_a_rare_liar_alone_on_its_blocks_is_caught_on_real_traffic_before_any_wrong_answer(
        tmp_path_factory, model_id, honest_answers):
    swarm = sole_liar_swarm(tmp_path_factory.mktemp("rare-liar"), "corrupt=0.1", "--ticket-rate", "0")
    try:
        for i in range(12):  # ~17 forwards each: it lies ~20 times, every one on probation
            q = QUESTIONS[i % len(QUESTIONS)]
            assert ask(swarm.oracle.url, model_id, q).choices[0].message.content == honest_answers[q]
        status = swarm.oracle.status()
        liar = swarm.scout("liar", status)
        assert liar["reputation"] in ("quarantined", "banned") and not status["tickets"].get("rate")  # no tickets ran
        detail = admin(swarm, f"/v1/scouts/{liar['peer_id']}")
        assert detail["failed"] >= 1 and {e["check"] for e in detail["evidence"]} == {"mirror"}
        assert detail["evidence"][0]["relative_error"] > 0.05
        assert detail["tainted"] is None or detail["tainted"]["sessions"] == []  # on probation nothing went unchecked
        assert "failed a check of its output" in open(swarm.oracle.log_path).read()
    finally:
        swarm.stop()


def test_answers_a_scout_computed_before_it_failed_are_marked_in_storage(tmp_path_factory, model_id, honest_answers):
    """Nothing followed (no probation, no floor): the liar's first forwards go out unchecked; the
    golden ticket after its first forward fails it; what it served is tainted."""
    swarm = sole_liar_swarm(tmp_path_factory.mktemp("taint"), "corrupt=1", "--audit-probation", "0", "--audit-floor", "0",
                            "--audit-budget", "0", "--audit-reprobation", "0", "--ticket-rate", "1",
                            "--ticket-idle-seconds", "1000000000")
    try:
        made = {}
        for i in range(8):
            q = QUESTIONS[i % len(QUESTIONS)]
            made[ask(swarm.oracle.url, model_id, q, store=True).id] = q
            if swarm.scout("liar")["reputation"] != "active":
                break
        liar = swarm.scout("liar")
        assert liar["reputation"] in ("quarantined", "banned") and liar["tainted_sessions"] >= 1
        after = ask(swarm.oracle.url, model_id, QUESTIONS[0], store=True)  # computed without the liar
        assert after.choices[0].message.content == honest_answers[QUESTIONS[0]]
        peer = liar["peer_id"]
        stored = swarm.oracle.wait_for("the marks written", lambda _: (
            s := {i: admin(swarm, f"/v1/chat/completions/{i}") for i in made}) and
            any(r["tainted_by"] for r in s.values()) and s)
        marked = {i for i, r in stored.items() if r["tainted_by"]}
        wrong = {i for i, r in stored.items() if r["choices"][0]["message"]["content"] != honest_answers[made[i]]}
        assert wrong <= marked  # every wrong answer it delivered is marked
        assert all(m["peer_id"] == peer for r in stored.values() for m in r["tainted_by"] or [])
        assert admin(swarm, f"/v1/chat/completions/{after.id}")["tainted_by"] is None
        assert set(admin(swarm, f"/v1/scouts/{peer}")["tainted"]["completions"]) == marked
    finally:
        swarm.stop()


def test_plausibility_checks_never_trip_on_honest_scouts_of_every_backend(tmp_path_factory, model_id):
    """Half of the sessions followed (they calibrate the checks), the other half judged by them."""
    swarm = ScoutSwarm(tmp_path_factory.mktemp("plausible"), "--blocks-per-scout", "15", "--dead-after", "2",
                       "--ticket-rate", "0", "--audit-probation", "0", "--audit-floor", "0.5", "--audit-budget", "0")
    try:
        for name, extra in (("quant", []), ("dense", ["--backend", "dense"]), ("quant-2", ["--threads", "2"]),
                            ("dense-2", ["--backend", "dense", "--threads", "2"])):
            swarm.add(name, *extra)
        swarm.oracle.wait_for("four Scouts", lambda st: len([s for s in st["scouts"] if s["state"] in ("active", "spare")]) == 4)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for _ in range(3):
                list(pool.map(lambda q: ask(swarm.oracle.url, model_id, q, max_tokens=48), QUESTIONS * 2))
        status = swarm.oracle.status()
        plausibility = status["audits"]["plausibility"]
        assert plausibility["calibrated_spans"] and plausibility["judged"] > 0
        assert plausibility["flagged"] == 0 and status["tickets"]["failed"] == 0
        assert all(s["reputation"] == "active" for s in status["scouts"] if s["state"] != "dead")
        assert sum(s["clean_checks"] or 0 for s in status["scouts"]) > 0
    finally:
        swarm.stop()
