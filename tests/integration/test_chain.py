"""Scout-to-Scout chaining with real Scout processes: Oracle → S1 → S2 → S3 → Oracle gives the
single process's answers in fewer trips, a Scout that others cannot relay to is reached the hub
way, a route mixes chained links with a Scout behind NAT, and a Scout killed in the middle of a
chain fails over to its replica."""

from __future__ import annotations

import pytest

from oracle.swarm.local_scouts import LocalScout

from .conftest import OracleProcess, ScoutSwarm, greedy_answers, static_scouts, stream_killing_the_carrier

PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]
SPANS = ((0, 10), (10, 20), (20, 30))


@pytest.fixture(scope="module")
def chain_scouts(tmp_path_factory):
    yield from static_scouts(tmp_path_factory, SPANS, "chain")


def answers(url: str, model_id: str) -> list[str]:
    return greedy_answers(url, model_id, PROMPTS, 20)


def test_a_chain_of_three_scouts_answers_as_one_process(chain_scouts, server, model_id, tmp_path):
    swarm = OracleProcess(tmp_path, "--scouts", ",".join(str(s.address) for s in chain_scouts), "--no-audits")
    try:
        assert answers(swarm.url, model_id) == answers(server, model_id)
        plane = swarm.status()["data_plane"]
        chain = plane["chain"]
        assert chain["enabled"] and chain["fallbacks"] == 0 and chain["passes"] > 0
        assert chain["hops"] == 3 * chain["passes"]
        # Every pass went through all three Scouts as one chain: one request out and one answer back
        # (the hub path makes three); the rest are the frees of finished sessions.
        scouts = swarm.status()["scouts"]
        assert chain["passes"] == plane["passes"]
        assert plane["round_trips"] == plane["passes"] + sum(s["round_trips"].get("cache", 0) for s in scouts)
        assert all(s["chained_forwards"] == chain["passes"] and s["forwards"] == 0 for s in scouts)
    finally:
        swarm.stop()


def test_a_scout_others_cannot_relay_to_is_reached_the_hub_way(chain_scouts, server, model_id, tmp_path_factory, tmp_path):
    walled = LocalScout((10, 20), tmp_path_factory.mktemp("walled"), ["--inject-faults", "refuse_relays=1"])
    try:
        first, _, last = chain_scouts
        swarm = OracleProcess(tmp_path, "--scouts", ",".join(str(s.address) for s in (first, walled, last)), "--no-audits")
        try:
            assert answers(swarm.url, model_id) == answers(server, model_id)
            chain = swarm.status()["data_plane"]["chain"]
            assert chain["breaks"] == 1 and chain["fallbacks"] == 1
            assert [(p["from_peer"], p["to_peer"]) for p in chain["hub_only"]] == [(first.address.peer_id, walled.address.peer_id)]
            assert chain["passes"] > 0 and chain["hops"] == 2 * chain["passes"]  # walled → last still chains
            assert "broke at hop 1" in open(swarm.log_path).read()
        finally:
            swarm.stop()
    finally:
        walled.stop()


def test_killing_the_middle_of_a_chain_fails_over_to_its_replica(chain_scouts, server, model_id, tmp_path_factory, tmp_path):
    pair = [LocalScout((10, 20), tmp_path_factory.mktemp("replica")) for _ in range(2)]
    try:
        first, _, last = chain_scouts
        swarm = OracleProcess(tmp_path, "--scouts", ",".join(str(s.address) for s in (first, *pair, last)), "--no-audits")
        try:
            # SIGKILL the replica carrying the session, in the middle of the chain, mid-stream.
            streamed, expected, killed = stream_killing_the_carrier(swarm, pair, (10, 20), server, model_id, 32)
            assert streamed == expected
            log = open(swarm.log_path).read()
            assert "failed: route" in log and killed in log
            chain = swarm.status()["data_plane"]["chain"]
            assert chain["passes"] > 0 and chain["fallbacks"] >= 1  # chained before and after the failover
        finally:
            swarm.stop()
    finally:
        for s in pair:
            s.stop()


def test_a_route_mixes_chained_links_and_a_scout_behind_nat(tmp_path_factory, server, model_id):
    """Scouts a, b (``--no-listen``: it dials the Oracle, no address to relay to) and c join over
    libp2p and get blocks 0–10, 10–20, 20–30: a step goes Oracle → a → Oracle → b → c → Oracle."""
    swarm = ScoutSwarm(tmp_path_factory.mktemp("mixed"), "--blocks-per-scout", "10", "--no-audits")
    try:
        for name, extra in (("a", ()), ("b", ("--no-listen",)), ("c", ())):
            swarm.add(name, *extra)
            swarm.oracle.wait_for(f"Scout {name} serving", lambda st, name=name: (s := swarm.scout(name, st))
                                  and s["state"] in ("active", "spare"), timeout=120)
        assert greedy_answers(swarm.oracle.url, model_id, PROMPTS, 20) == answers(server, model_id)
        status = swarm.oracle.status()
        a, b, c = (swarm.scout(name, status) for name in "abc")
        assert [a["span"], b["span"], c["span"]] == [[0, 10], [10, 20], [20, 30]] and b["reached"] == "scout-dialed"
        chain = status["data_plane"]["chain"]
        assert chain["passes"] > 0 and chain["hops"] == 2 * chain["passes"] and chain["fallbacks"] == 0
        assert a["forwards"] > 0 and a["chained_forwards"] == 0  # nobody can relay to b: a goes the hub way
        assert b["chained_forwards"] == c["chained_forwards"] == chain["passes"]  # b dials out to c
    finally:
        swarm.stop()
