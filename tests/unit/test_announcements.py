import time

import pytest

from shard_common.p2p.announcements import (
    MAX_MESSAGE_BYTES, AnnouncementError, OracleAnnouncement, ScoutAnnouncement, decode, encode, proof_problem, prove,
)


def scout(peer="12D3KooWscout", **kw) -> ScoutAnnouncement:
    return ScoutAnnouncement(peer_id=peer, data_host="127.0.0.1", data_port=9000, **kw)


def test_round_trip_and_refusals():
    a = scout(span=(0, 15), state="serving")
    assert decode(ScoutAnnouncement, "12D3KooWscout", encode(a)) == a
    with pytest.raises(AnnouncementError, match="in the name of"):
        decode(ScoutAnnouncement, "12D3KooWsomeoneelse", encode(a))  # a peer speaking for another
    with pytest.raises(AnnouncementError, match="malformed"):
        decode(ScoutAnnouncement, "12D3KooWscout", b'{"peer_id": "12D3KooWscout", "data_port": "x"}')
    with pytest.raises(AnnouncementError, match="bytes"):
        decode(ScoutAnnouncement, "12D3KooWscout", b" " * (MAX_MESSAGE_BYTES + 1))
    huge = OracleAnnouncement(peer_id="o", model="m", model_name="m", n_layers=30,
                              assignments={f"12D3KooW{i:050d}": (0, 15) for i in range(2000)})
    with pytest.raises(AnnouncementError, match="exceeds"):
        encode(huge)  # far below gossipsub's silent 1 MiB drop


def test_swarm_secret_proofs():
    secret = "s3cret"
    a = prove(secret, scout())
    assert proof_problem(secret, decode(ScoutAnnouncement, a.peer_id, encode(a))) is None
    assert "does not prove" in proof_problem(secret, scout())
    assert "does not prove" in proof_problem("other", a)
    lifted = scout(peer="12D3KooWthief", seq=a.seq, sent_at=a.sent_at, proof=a.proof)  # someone else's proof
    assert "does not prove" in proof_problem(secret, lifted)
    old = prove(secret, scout(sent_at=time.time() - 600))
    assert "stale" in proof_problem(secret, old)
    assert proof_problem(None, scout()) is None  # an open swarm asks nothing
