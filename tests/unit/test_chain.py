from types import SimpleNamespace

import pytest

from oracle.swarm.remote import ScoutAddress, ScoutError, plan_chain, trim_chunks


def test_trim_chunks_keeps_the_feeding_pattern():
    assert trim_chunks([37, 1, 1, 1], 39) == [37, 1, 1]
    assert trim_chunks([37, 1, 1], 20) == [20]
    assert trim_chunks([5, 5], 10) == [5, 5]
    assert trim_chunks([], 0) == []


def conn(start, end, name):
    return SimpleNamespace(span=(start, end), name=name)


def test_plan_chain_prefers_long_spans_and_reports_gaps():
    a, b, c = conn(0, 10, "a"), conn(10, 30, "b"), conn(0, 30, "whole")
    assert [x.name for x in plan_chain([a, b], 30)] == ["a", "b"]
    assert [x.name for x in plan_chain([a, b, c], 30)] == ["whole"]
    with pytest.raises(ScoutError, match="no Scout serves block 10"):
        plan_chain([a], 30)


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


def test_plan_chain_fills_gaps_with_local_blocks():
    b = conn(10, 20, "b")
    filled = plan_chain([b], 30, fill=lambda s, e: conn(s, e, f"local{s}-{e}"))
    assert [x.name for x in filled] == ["local0-10", "b", "local20-30"]
