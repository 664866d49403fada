"""The receiving side of Scout-to-Scout relays: a relay is used only for the Oracle's request that
names its sender, whichever of the two arrives first; anything else is refused or forgotten."""

from __future__ import annotations

import asyncio

import pytest

from scout.relay import RelayFailed, Relays
from shard_common.identity import Identity
from shard_common.protocol import Relay


def relay(request_id: int, oracle: str = "oracle") -> Relay:
    return Relay(id=request_id, oracle=oracle, dtype="float32", shape=(1, 4))


def run(body):
    return asyncio.run(body(Relays(Identity.generate())))


def test_a_relay_waits_for_its_request_and_a_request_for_its_relay():
    async def body(relays):
        relays.deliver("s1", relay(7), b"early")  # before the Oracle's request
        assert (await relays.expect("oracle", 7, "s1")).body == b"early"
        waiting = asyncio.ensure_future(relays.expect("oracle", 8, "s1"))
        await asyncio.sleep(0)
        relays.deliver("s1", relay(8), b"late")
        assert (await waiting).body == b"late"
        assert relays.status() == {"sent": 0, "received": 2, "refused": 0, "waiting": 0}

    run(body)


def test_a_relay_from_another_peer_or_for_another_oracle_is_not_used():
    async def body(relays):
        waiting = asyncio.ensure_future(relays.expect("oracle", 1, "s1"))
        await asyncio.sleep(0)
        relays.deliver("intruder", relay(1), b"forged")
        with pytest.raises(RelayFailed) as e:
            await waiting
        assert e.value.code == "relay_refused"
        relays.deliver("s1", relay(2, oracle="someone-else"), b"x")  # kept apart: another Oracle's request 2
        relays.WAIT_SECONDS = 0.05
        with pytest.raises(RelayFailed) as e:
            await relays.expect("oracle", 2, "s1")
        assert e.value.code == "relay_timeout"

    run(body)


def test_early_relays_are_bounded():
    async def body(relays):
        for i in range(Relays.MAX_EARLY + 10):
            relays.deliver("s1", relay(i), b"")
        assert len(relays._early) == Relays.MAX_EARLY and (("oracle", 0) not in relays._early)
        relays.MAX_EARLY_BYTES = 10
        relays.deliver("s1", relay(1000), b"x" * 8)
        relays.deliver("s1", relay(1001), b"x" * 8)  # past the byte cap: the oldest go until it fits
        assert list(relays._early) == [("oracle", 1001)] and relays._early_bytes == 8

    run(body)


def test_a_scout_refusing_relays_fails_the_request_waiting_for_one():
    async def body(relays):
        relays.refuse = True
        waiting = asyncio.ensure_future(relays.expect("oracle", 3, "s1"))
        await asyncio.sleep(0)
        with pytest.raises(ConnectionRefusedError):
            relays.deliver("s1", relay(3), b"")
        with pytest.raises(RelayFailed, match="refuses relays"):
            await waiting

    run(body)
