"""Hostile gossip reaching the control plane's handlers: garbage, oversize, a peer speaking for
another, replays, missing swarm-secret proofs. Each is refused with a log line; nothing changes."""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace

import pytest

from oracle.swarm.control import ModelOffer, OracleControl
from scout.control import ScoutControl
from shard_common.identity import Identity
from shard_common.p2p.announcements import MAX_MESSAGE_BYTES, Capabilities, OracleAnnouncement, ScoutAnnouncement, encode, prove
from shard_common.p2p.node import P2PConfig


def oracle_control(**kw) -> OracleControl:
    return OracleControl(Identity.generate(), P2PConfig(), ModelOffer("digest", "m", 30, 1000, None), **kw)


def heartbeat(peer: str, seq: int, sent_at: float, **kw) -> ScoutAnnouncement:
    return ScoutAnnouncement(peer_id=peer, seq=seq, sent_at=sent_at, data_host="127.0.0.1", data_port=9000, **kw)


def test_the_oracle_refuses_garbage_oversize_impostors_and_wrong_kinds(caplog):
    control = oracle_control()
    scout = Identity.generate().peer_id
    caplog.set_level(logging.INFO)
    for data in (b"\xff\x00garbage", b"[]", b" " * (MAX_MESSAGE_BYTES + 1),
                 encode(heartbeat(Identity.generate().peer_id, 1, time.time())),  # in another peer's name
                 encode(OracleAnnouncement(peer_id=scout, model="x", model_name="x", n_layers=1))):  # wrong kind here
        control._on_scout(scout, data)
    assert control.scouts == {}
    assert caplog.text.count("ignored announcement") == 5
    assert "in the name of" in caplog.text


def test_a_replayed_heartbeat_neither_rolls_a_scout_back_nor_keeps_it_alive(caplog):
    control = oracle_control()
    scout = Identity.generate().peer_id
    now = time.time()
    old = heartbeat(scout, 3, now - 5, span=(0, 15), state="serving")
    control._on_scout(scout, encode(heartbeat(scout, 5, now, span=(15, 30), state="serving")))
    record = control.scouts[scout]
    record.last_seen -= 60  # it went quiet
    caplog.set_level(logging.DEBUG)
    for replay in (old, heartbeat(scout, 5, now, span=(15, 30), state="serving")):
        control._on_scout(scout, encode(replay))
    assert record.announcement.seq == 5 and record.announcement.span == (15, 30)
    assert time.monotonic() - record.last_seen > 59
    assert caplog.text.count("replayed announcement") == 2
    control._expire()
    assert record.dead
    # A restarted Scout counts from 1 again, later: that is news, not a replay.
    control._on_scout(scout, encode(heartbeat(scout, 1, time.time() + 1, state="idle")))
    assert not control.scouts[scout].dead


def test_a_private_swarm_refuses_scouts_without_the_secret(caplog):
    control = oracle_control(swarm_secret="s3cret")
    honest, stranger = Identity.generate().peer_id, Identity.generate().peer_id
    control._on_scout(honest, encode(prove("s3cret", heartbeat(honest, 1, time.time()))))
    control._on_scout(stranger, encode(prove("guess", heartbeat(stranger, 1, time.time()))))
    assert control.scouts[honest].refused is None
    assert "does not prove" in control.scouts[stranger].refused
    assert f"refused Scout {stranger}" in caplog.text
    assert [c.peer_id for c in map(control._candidate, control.scouts.values()) if not control.scouts[c.peer_id].refused] == [honest]


@pytest.fixture
def scout_control():
    server = SimpleNamespace(span=None, draft=None, port=9000, requests=0)
    return ScoutControl(Identity.generate(), P2PConfig(), server, None, lambda *a: None, "127.0.0.1", Capabilities(),
                        swarm_secret=None)


def oracle_says(oracle: str, seq: int, sent_at: float, assignments: dict) -> OracleAnnouncement:
    return OracleAnnouncement(peer_id=oracle, seq=seq, sent_at=sent_at, model="digest", model_name="m", n_layers=30,
                              assignments=assignments)


def test_a_scout_ignores_garbage_impostors_and_replayed_assignments(scout_control, caplog):
    oracle = Identity.generate().peer_id
    me = scout_control.identity.peer_id
    caplog.set_level(logging.DEBUG)

    async def feed():
        scout_control._on_oracle(oracle, b"{not json")
        scout_control._on_oracle(oracle, encode(oracle_says(Identity.generate().peer_id, 1, time.time(), {me: (0, 15)})))
        assert scout_control.oracle is None and scout_control._loading is None
        now = time.time()
        scout_control._on_oracle(oracle, encode(oracle_says(oracle, 7, now, {})))
        # Last hour's announcement, assigning this Scout a span, replayed by someone: ignored.
        scout_control._on_oracle(oracle, encode(oracle_says(oracle, 2, now - 3600, {me: (0, 15)})))

    asyncio.run(feed())
    assert scout_control.oracle.seq == 7 and scout_control._loading is None
    assert caplog.text.count("ignored announcement") == 2 and "replayed announcement" in caplog.text


def test_a_scout_in_a_private_swarm_ignores_an_oracle_without_the_secret(caplog):
    server = SimpleNamespace(span=None, draft=None, port=9000, requests=0)
    control = ScoutControl(Identity.generate(), P2PConfig(), server, None, lambda *a: None, "127.0.0.1", Capabilities(),
                           swarm_secret="s3cret")
    rogue = Identity.generate().peer_id
    control._on_oracle(rogue, encode(oracle_says(rogue, 1, time.time(), {control.identity.peer_id: (0, 30)})))
    assert control.oracle is None and f"ignoring Oracle {rogue}" in caplog.text
