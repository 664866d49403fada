"""Which hops a step may chain through (pure), and how long a link that could not relay stays hub-only."""

from __future__ import annotations

from oracle.swarm.chain import ChainBreaks, Link, chain_length
from scout.faults import FaultInjector
from shard_common.protocol import Forward, NextHop, SessionSlice

import pytest
from pydantic import ValidationError


def never(a, b):
    return False


def test_a_chain_runs_through_scouts_the_oracle_dialed():
    assert chain_length([Link("a"), Link("b"), Link("c")], never) == 3
    assert chain_length([Link("a")], never) == 1
    assert chain_length([], never) == 1


def test_a_scout_that_dialed_in_is_reached_the_hub_way():
    links = [Link("a"), Link("b", dialable=False), Link("c")]
    assert chain_length(links, never) == 1  # a cannot relay to b
    assert chain_length(links[1:], never) == 2  # b dialed out: it can relay to c


def test_the_oracles_own_blocks_checked_forwards_and_stale_caches_end_a_chain():
    assert chain_length([Link("a"), Link("local", local=True), Link("c")], never) == 1
    assert chain_length([Link("local", local=True), Link("b")], never) == 1
    assert chain_length([Link("a", checked=True), Link("b")], never) == 1  # the audit must see a's input and output
    assert chain_length([Link("a"), Link("b"), Link("c", checked=True)], never) == 2
    assert chain_length([Link("a"), Link("b", stale=True)], never) == 1
    assert chain_length([Link("a"), Link("b", usable=False)], never) == 1  # quarantined or dead: the hub path reroutes


def test_a_broken_link_splits_the_chain():
    assert chain_length([Link("a"), Link("b"), Link("c")], lambda x, y: (x, y) == ("b", "c")) == 2


def test_breaks_back_off_and_heal():
    now = [0.0]
    breaks = ChainBreaks(clock=lambda: now[0])
    breaks.record("a", "b")
    assert breaks.broken("a", "b") and not breaks.broken("b", "a")
    now[0] = 61
    assert not breaks.broken("a", "b")
    breaks.record("a", "b")  # broke again: twice as long
    now[0] = 61 + 119
    assert breaks.broken("a", "b")
    assert breaks.status()["breaks"] == 2 and breaks.status()["hub_only"][0]["from_peer"] == "a"
    breaks.healed("a", "b")
    assert not breaks.broken("a", "b") and breaks.status()["hub_only"] == []
    for _ in range(20):
        breaks.record("x", "y")
    assert breaks._until[("x", "y")][1] == ChainBreaks.MAX_SECONDS


def test_chained_forward_messages_are_validated():
    s = [SessionSlice(session="s", start=0, n_tokens=1)]
    hop = NextHop(peer_id="p", host="127.0.0.1", port=7000, id=3)
    assert Forward(sessions=s, dtype="float32", shape=(1, 8), next=hop, source="q").next.id == 3
    for bad in ({"port": 0}, {"id": 0}, {"host": "h" * 300}):
        with pytest.raises(ValidationError):
            NextHop(**{**hop.model_dump(), **bad})


def test_refusing_relays_is_a_known_fault():
    assert FaultInjector("refuse_relays=1").refuse_relays
    assert not FaultInjector("").refuse_relays
