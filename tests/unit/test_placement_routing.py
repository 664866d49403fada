from types import SimpleNamespace

import pytest

from oracle.swarm.placement import Candidate, coverage, first_gap, plan
from oracle.swarm.connection import ScoutAddress
from oracle.swarm.history import SessionHistory
from shard_common.model.span import SpanRequest
from oracle.swarm.router import LOCAL_HOP_COST, NoRoute, RouteOption, choose_route, hop_cost, uncovered


def test_session_history_replays_what_was_fed_rejected_drafts_included():
    import torch

    h = SessionHistory()
    rows = torch.arange(12.0).reshape(12, 1)
    h.record(SpanRequest("s", 0, 5), rows[:5])  # the prompt
    h.record(SpanRequest("s", 5, 4), rows[5:9])  # a pending token and three drafts...
    h.rollback("s", 6)  # ...all rejected
    h.record(SpanRequest("s", 6, 1), rows[9:10])
    assert [(p, r.flatten().tolist(), k) for p, r, k in h.replay("s", 7)] == [(0, [0, 1, 2, 3, 4], 5), (5, [5, 6, 7, 8], 1), (6, [9], 1)]
    assert [(p, k) for p, _, k in h.replay("s", 3)] == [(0, 3)]  # up to a position inside the prompt
    h.fork("s", "t")
    h.rollback("t", 5)
    assert [p for p, _, _ in h.replay("t", 99)] == [0] and [p for p, _, _ in h.replay("s", 99)] == [0, 5, 6]
    h.record(SpanRequest("s", 5, 2), rows[10:12])  # a step from an earlier position drops what followed
    assert [(p, k) for p, _, k in h.replay("s", 99)] == [(0, 5), (5, 2)]
    h.free("s")
    assert list(h.replay("s", 99)) == []


def test_scout_address_parsing():
    assert ScoutAddress.parse("12D3KooWx@127.0.0.1:9000") == ScoutAddress("12D3KooWx", "127.0.0.1", 9000)
    assert ScoutAddress.parse("p@[::1]:9").host == "::1"
    assert str(ScoutAddress.parse("p@[::1]:9")) == "p@[::1]:9"
    with pytest.raises(ValueError):
        ScoutAddress.parse("no-port")


def test_peer_ids_match_libp2p():
    """Vector computed with py-libp2p 0.8.1 (ID.from_pubkey of the Ed25519 key from seed 0x01*32)."""
    from shard_common.identity import peer_id_of

    key = bytes.fromhex("8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c")
    assert peer_id_of(key) == "12D3KooWK99VoVxNE7XzyBwXEzW7xhK7Gpv85r9F3V3fyKSUKPH5"


def test_libp2p_derives_the_same_peer_id_from_an_identity():
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    from shard_common.identity import Identity

    ident = Identity.generate()
    key = Ed25519PrivateKey.from_bytes(ident.private_bytes())
    assert ID.from_pubkey(key.get_public_key()).to_base58() == ident.peer_id


# ---- placement ---------------------------------------------------------------------------------

def scouts(*names, max_blocks=100, throughput=1.0):
    return [Candidate(n, max_blocks, throughput) for n in names]


def test_newcomers_fill_the_model_back_to_back_then_replicate_the_weakest_span():
    assigned = plan(30, scouts("a"), {}, span_limit=15)
    assert assigned == {"a": (0, 15)}
    assigned = plan(30, scouts("a", "b"), assigned, span_limit=15)
    assert assigned == {"a": (0, 15), "b": (15, 30)}
    # A third Scout replicates a span; a slow second replica of it leaves the other span weaker.
    three = [Candidate("a", 100, 1.0), Candidate("b", 100, 1.0), Candidate("c", 100, 0.5)]
    assigned = plan(30, three, assigned, span_limit=15)
    assert assigned["c"] in [(0, 15), (15, 30)]
    d = plan(30, three + [Candidate("d", 100, 1.0)], assigned, span_limit=15)["d"]
    assert d != assigned["c"] and d in [(0, 15), (15, 30)]


def test_memory_limits_the_span_and_gaps_are_filled_in_order():
    assigned = plan(30, [Candidate("small", 10), Candidate("big", 100)], {})
    assert assigned["big"] == (0, 30) and assigned["small"] == (0, 10)  # no span fits 10 blocks: it takes a part
    assigned = plan(30, [Candidate("small", 10), Candidate("tiny", 5)], {})
    assert assigned == {"small": (0, 10), "tiny": (10, 15)}
    assert coverage(list(assigned.values()), 30) == [1] * 15 + [0] * 15


def test_a_hole_left_by_a_dead_scout_is_filled_by_a_redundant_idle_one():
    current = {"a": (0, 15), "b": (15, 30), "c": (15, 30)}
    alive = [Candidate("b", 100), Candidate("c", 100, busy=True)]  # "a" died
    assigned = plan(30, alive, current, span_limit=15)
    assert assigned == {"b": (0, 15), "c": (15, 30)}  # the idle replica moved, the busy one stayed
    assert first_gap(list(assigned.values()), 30) is None
    # with nobody redundant, a survivor with room extends its span over the hole, past span_limit
    assert plan(30, [Candidate("c", 100)], {"a": (0, 15), "c": (15, 30)}, span_limit=15) == {"c": (0, 30)}
    # ... but a hole nobody served yet waits for Scouts to join (a swarm starting up splits evenly)
    assert plan(30, [Candidate("c", 100)], {"c": (15, 30)}, span_limit=15) == {"c": (15, 30)}


def test_survivors_extend_over_a_hole_as_far_as_their_memory_holds():
    current = {"a": (0, 10), "b": (10, 20), "c": (20, 30)}
    # "b" died: the neighbour that can cover all of it takes it (the faster one among equals)
    assigned = plan(30, [Candidate("a", 30, throughput=1.0), Candidate("c", 30, throughput=2.0)], current, span_limit=10)
    assert assigned == {"a": (0, 10), "c": (10, 30)}
    # neither can hold it all: both extend, each as far as it can
    assigned = plan(30, [Candidate("a", 14), Candidate("c", 16)], current, span_limit=10)
    assert assigned == {"a": (0, 14), "c": (14, 30)}
    # nobody has room: the hole stays (requests get no_route, or --fallback-local computes it)
    assigned = plan(30, [Candidate("a", 10), Candidate("c", 10)], current, span_limit=10)
    assert assigned == {"a": (0, 10), "c": (20, 30)}


def test_a_restarted_oracle_adopts_what_scouts_already_serve():
    found = [Candidate("a", 100, serving=(0, 11)), Candidate("b", 100, serving=(11, 30))]
    assert plan(30, found, {}, span_limit=15) == {"a": (0, 11), "b": (11, 30)}
    # ... unless it no longer fits the model
    assert plan(20, [Candidate("a", 100, serving=(11, 30))], {})["a"] == (0, 20)


def test_lopsided_replication_is_evened_out_by_idle_scouts_only():
    # What a restarted Oracle found after a wave of deaths: three replicas of one half, one of the other.
    found = [Candidate("a", 100, serving=(0, 15)), Candidate("b", 100, serving=(0, 15), busy=True),
             Candidate("c", 100, serving=(0, 15)), Candidate("d", 100, serving=(15, 30))]
    assigned = plan(30, found, {}, span_limit=15)
    assert sorted(assigned.values()) == [(0, 15), (0, 15), (15, 30), (15, 30)]
    assert assigned["b"] == (0, 15)  # the busy one kept its sessions
    assert plan(30, found, assigned, span_limit=15) == assigned  # settled: no further moves
    # A surplus of one is not worth a reload.
    three = [Candidate("a", 100, serving=(0, 15)), Candidate("b", 100, serving=(0, 15)), Candidate("d", 100, serving=(15, 30))]
    assert plan(30, three, {}, span_limit=15) == {"a": (0, 15), "b": (0, 15), "d": (15, 30)}


# ---- routing -----------------------------------------------------------------------------------

def hop(start, end, name, cost=1.0):
    return SimpleNamespace(span=(start, end), name=name, option=RouteOption((start, end), latency_ms=cost))


def route(hops, start=0, end=30):
    return [hops[i].name for i in choose_route([h.option for h in hops], start, end)]


def test_shortest_path_takes_the_cheapest_chain_and_reports_gaps():
    a, b, whole = hop(0, 10, "a"), hop(10, 30, "b"), hop(0, 30, "whole", cost=5.0)
    assert route([a, b, whole]) == ["a", "b"]
    assert route([a, b, hop(0, 30, "fast", cost=1.5)]) == ["fast"]
    assert route([a, hop(10, 30, "slow", 9.0), hop(10, 30, "quick", 2.0)]) == ["a", "quick"]
    assert route([a, b], 10, 30) == ["b"]
    with pytest.raises(NoRoute, match="no Scout serves block 10"):
        route([a])


def test_hop_cost_weighs_latency_load_and_makes_local_blocks_a_last_resort():
    assert hop_cost(RouteOption((0, 10), latency_ms=4.0, sessions=8)) == 8.0
    assert hop_cost(RouteOption((0, 10))) == hop_cost(RouteOption((0, 10), latency_ms=5.0))  # unmeasured
    assert hop_cost(RouteOption((0, 10), latency_ms=1.0, local=True)) == LOCAL_HOP_COST
    local = SimpleNamespace(span=(10, 30), name="local", option=RouteOption((10, 30), local=True))
    remote = SimpleNamespace(span=(10, 30), name="remote", option=RouteOption((10, 30), latency_ms=500.0))
    assert route([hop(0, 10, "a"), local, remote]) == ["a", "remote"]
    assert route([hop(0, 10, "a"), local]) == ["a", "local"]


def test_uncovered_lists_the_stretches_no_span_serves():
    assert uncovered([(0, 10), (20, 30)], 0, 30) == [(10, 20)]
    assert uncovered([(0, 10), (5, 30)], 0, 30) == []
    assert uncovered([], 5, 9) == [(5, 9)]
    assert uncovered([(0, 12)], 10, 30) == [(12, 30)]
