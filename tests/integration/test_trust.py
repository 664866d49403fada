"""Untrusted Scouts with real processes: audits of real traffic and golden tickets catch Scouts that
lie, quarantine and ban them, keep clients' answers right, and leave honest Scouts alone; the
reputation lives in Redis and survives an Oracle restart; a private swarm keeps strangers out."""

from __future__ import annotations

import openai
import pytest
import requests

from oracle.swarm.local_scouts import LocalScout
from shard_common.identity import verify_reply

from .conftest import ADMIN_KEY, ScoutSwarm

SECRET = "correct horse battery staple"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain."]


def answers(url: str, model_id: str, questions=QUESTIONS) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    return [c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=16,
                                      extra_body={"speculative": "off"}).choices[0].message.content for q in questions]


def admin(swarm: ScoutSwarm, method: str, path: str) -> requests.Response:
    return requests.request(method, swarm.oracle.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)


def join(swarm: ScoutSwarm, name: str, *extra: str, secret: bool = True) -> LocalScout:
    return swarm.add(name, *extra, *(["--swarm-secret", SECRET] if secret else []))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    s = ScoutSwarm(tmp_path_factory.mktemp("trust"), "--blocks-per-scout", "15", "--dead-after", "2", "--fallback-local",
                   "--ticket-rate", "0.2", "--ticket-idle-seconds", "0.5", "--swarm-secret", SECRET)
    try:
        yield s
    finally:
        s.stop()


def test_a_scout_lying_from_the_start_never_reaches_a_client(swarm, server, model_id):
    """The liar joins first and gets blocks 0..15; every answer is still right (its forwards are
    checked on probation: the first wrong one quarantines it and the Oracle computes its blocks)."""
    liar = join(swarm, "liar", "--inject-faults", "corrupt=1")
    swarm.oracle.wait_for("the liar serving", lambda st: (s := swarm.scout("liar", st)) and s["state"] in ("active", "spare", "quarantined"))
    join(swarm, "honest-b")
    swarm.oracle.wait_for("two Scouts", lambda st: len([s for s in st["scouts"] if s.get("assigned_span")]) == 2)
    assert answers(swarm.oracle.url, model_id) == answers(server, model_id)
    status = swarm.oracle.wait_for("the liar quarantined", lambda st: (s := swarm.scout("liar", st)) and
                                   s["reputation"] in ("quarantined", "banned") and st)
    assert swarm.scout("liar", status)["requests"] <= 10
    assert status["tickets"]["failed"] >= 1
    log = open(swarm.oracle.log_path).read()
    assert "failed a check of its output" in log or "failed a golden ticket" in log
    detail = admin(swarm, "GET", f"/v1/scouts/{liar.address.peer_id}").json()
    assert detail["failed"] >= 1 and detail["evidence"][0]["relative_error"] > 0.05
    signed = [e["reply"] for e in detail["evidence"] if e.get("reply")]
    assert signed and all(verify_reply(liar.address.peer_id, **r) for r in signed)  # the ban rests on its own signature


def test_the_liar_is_banned_and_its_reconnect_refused(swarm):
    liar = swarm.scouts["liar"]
    swarm.oracle.wait_for("the ban", lambda st: (s := swarm.scout("liar", st)) and s["reputation"] == "banned")
    bans = admin(swarm, "GET", "/v1/scouts/bans").json()["data"]
    assert [b["peer_id"] for b in bans] == [liar.address.peer_id] and bans[0]["ban_until"] > 0
    liar.stop()  # it comes back with the same identity: refused
    join(swarm, "liar", "--inject-faults", "corrupt=1")
    refused = swarm.oracle.wait_for("the refusal", lambda st: (s := swarm.scout("liar", st)) and s["state"] == "refused" and s)
    assert "banned" in refused["refused"]


def test_honest_scouts_are_never_quarantined(swarm, server, model_id):
    """Honest Scouts, one on fp32 activations (--backend dense) where the Oracle uses bf16 ones,
    judged by many tickets and mirrored forwards."""
    join(swarm, "honest-a")
    join(swarm, "honest-dense", "--backend", "dense")
    swarm.oracle.wait_for("three honest Scouts", lambda st: len([s for s in st["scouts"] if s["state"] in ("active", "spare")]) >= 3)
    # Not the haiku: its third line is a near-tie that fp32 activations resolve differently.
    for _ in range(3):
        assert answers(swarm.oracle.url, model_id, QUESTIONS[:2]) == answers(server, model_id, QUESTIONS[:2])
    swarm.oracle.wait_for("tickets for everyone", lambda st: all(
        (r := admin(swarm, "GET", f"/v1/scouts/{swarm.scouts[n].address.peer_id}")).ok and r.json()["passed"] >= 5
        for n in ("honest-a", "honest-b", "honest-dense")), timeout=90)
    for name in ("honest-a", "honest-b", "honest-dense"):
        record = admin(swarm, "GET", f"/v1/scouts/{swarm.scouts[name].address.peer_id}").json()
        assert record["state"] == "active" and record["failed"] == 0, record
    assert swarm.oracle.status()["tickets"]["honest_error_max"] < 0.05


def test_a_scout_lying_one_time_in_five_is_caught(swarm):
    join(swarm, "sometimes", "--inject-faults", "corrupt=0.2")
    swarm.oracle.wait_for("the occasional liar quarantined", lambda st: (s := swarm.scout("sometimes", st)) and
                          s["reputation"] in ("quarantined", "banned"), timeout=120)


def test_unban_and_reputation_survive_an_oracle_restart(swarm):
    liar = swarm.scouts["liar"].address.peer_id
    swarm.restart_oracle()
    records = {r["peer_id"]: r for r in admin(swarm, "GET", "/v1/scouts").json()["data"]}
    assert records[liar]["state"] == "banned" and records[liar]["failed"] >= 3
    unbanned = admin(swarm, "POST", f"/v1/scouts/{liar}/unban").json()
    assert unbanned["state"] == "active" and unbanned["recent"] == ""
    assert admin(swarm, "POST", "/v1/scouts/12D3KooWnobody/unban").status_code == 404
    assert admin(swarm, "POST", f"/v1/scouts/{liar}/reset").json()["deleted"] is True
    assert liar not in {r["peer_id"] for r in admin(swarm, "GET", "/v1/scouts").json()["data"]}


def test_a_scout_without_the_swarm_secret_cannot_join(swarm):
    join(swarm, "stranger", secret=False)
    stranger = swarm.oracle.wait_for("the stranger refused", lambda st: (s := swarm.scout("stranger", st)) and s["state"] == "refused" and s)
    assert "swarm secret" in stranger["refused"] and stranger["assigned_span"] is None


def test_scout_endpoints_need_the_admin_key(swarm):
    user = requests.post(swarm.oracle.url + "/v1/scouts", timeout=5)
    assert user.status_code in (401, 405)
    r = requests.get(swarm.oracle.url + "/v1/scouts", headers={"Authorization": "Bearer sk-oracle-nope" + "x" * 32}, timeout=5)
    assert r.status_code == 401
