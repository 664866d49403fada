"""PeerHealth, the one owner of every peer's health and trust, and waiting on another thread's
event loop without ever waiting on a stopped one."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from oracle.trust.health import HealthPolicy, Outcome, PeerHealth
from shard_common.main_thread import LoopStopped, wait_on_loop


class FakeReputation:
    """Redis's verdict script, as plain data: one failure quarantines, two ban."""

    def __init__(self, fail: bool = False):
        self.failures: dict[str, int] = {}
        self.fail = fail

    async def record(self, peer, passed, evidence=None):
        if self.fail:
            raise OSError("Redis is away")
        self.failures[peer] = self.failures.get(peer, 0) + (not passed)
        n = self.failures[peer]
        return ("banned", time.time() + 60) if n >= 2 else ("quarantined", 0.0) if n else ("active", 0.0)

    async def states(self):
        return {"old-liar": ("banned", time.time() + 60)}


def test_timeouts_cool_a_peer_down_doubling_and_an_answer_after_the_pause_resets_it():
    health = PeerHealth(policy=HealthPolicy(cooldown_seconds=(0.05, 0.2)))
    assert health.usable("s") and health.may_connect("s")
    health.record("s", Outcome.TIMED_OUT)
    assert not health.usable("s") and not health.may_connect("s") and 0 < health.cooling_down("s") <= 0.05
    health.record("s", Outcome.TIMED_OUT)
    assert 0.05 < health.cooling_down("s") <= 0.1  # doubled
    time.sleep(0.11)
    assert health.usable("s")
    health.record("s", Outcome.ANSWERED)  # answering again after the pause
    health.record("s", Outcome.TIMED_OUT)
    assert health.cooling_down("s") <= 0.05  # from the shortest pause again
    assert health.status("s")["reachable"] is False


def test_probation_counts_mirrored_forwards_from_each_connection():
    health = PeerHealth(policy=HealthPolicy(probation=2))
    health.record("s", Outcome.CONNECTED)
    assert health.probation_left("s") == 2
    health.record("s", Outcome.MIRROR_PASSED)
    health.record("s", Outcome.MIRROR_PASSED)
    health.record("s", Outcome.MIRROR_PASSED)
    assert health.probation_left("s") == 0
    health.record("s", Outcome.CONNECTED)  # a new connection: on probation again
    assert health.probation_left("s") == 2


def test_clean_checks_count_and_probation_returns_at_random_and_after_a_quarantine():
    async def main():
        reputation = FakeReputation()
        health = PeerHealth(reputation, HealthPolicy(probation=3))
        await health.start()
        health.record("s", Outcome.CONNECTED)
        for _ in range(3):
            health.record("s", Outcome.MIRROR_PASSED)
        health.record("s", Outcome.TICKET_PASSED)
        assert health.probation_left("s") == 0 and health.clean_checks("s") == 4
        health.start_probation("s", 2)  # a random re-probation
        assert health.probation_left("s") == 2 and health.status("s")["clean_checks"] == 4
        health.record("s", Outcome.MIRROR_FAILED)
        await health.drain()
        assert health.trust("s") == "quarantined"
        reputation.failures["s"] = 0  # clean tickets ended the quarantine in Redis
        health.record("s", Outcome.TICKET_PASSED)
        await health.drain()
        assert health.trust("s") == "active" and health.probation_left("s") == 3  # checked from the start again

    asyncio.run(main())


def test_the_oracles_own_scouts_are_not_audited():
    health = PeerHealth(policy=HealthPolicy(probation=5), own={"mine"})
    for peer in ("mine", "stranger"):
        health.record(peer, Outcome.CONNECTED)
    assert not health.audited("mine") and health.probation_left("mine") == 0
    assert health.audited("stranger") and health.probation_left("stranger") == 5


def test_a_failed_check_quarantines_at_once_and_redis_has_the_last_word():
    async def main():
        reputation = FakeReputation()
        health = PeerHealth(reputation)
        await health.start()
        assert health.refusal("old-liar") and not health.may_connect("old-liar")  # loaded from Redis
        health.record("s", Outcome.TICKET_FAILED, {"relative_error": 0.5})
        assert health.trust("s") == "quarantined" and not health.usable("s") and health.may_connect("s")
        await health.drain()
        health.record("s", Outcome.MIRROR_FAILED)
        await health.drain()
        assert health.trust("s") == "banned" and health.refusal("s") and not health.may_connect("s")
        health.set_trust("s", "active")  # an operator's unban
        assert health.usable("s") and health.refusal("s") is None

    asyncio.run(main())


def test_a_redis_hiccup_changes_nothing():
    async def main():
        health = PeerHealth(FakeReputation(fail=True))
        await health.start()
        health.record("s", Outcome.TICKET_PASSED)
        health.record("t", Outcome.TICKET_FAILED)
        await health.drain()
        assert health.trust("s") == "active" and health.trust("t") == "quarantined"

    asyncio.run(main())


def test_waiting_on_a_loop_that_stops_raises_instead_of_hanging():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def answer():
        return 42

    async def never():
        await asyncio.Event().wait()

    assert wait_on_loop(loop, answer()) == 42
    threading.Timer(0.3, lambda: loop.call_soon_threadsafe(loop.stop)).start()
    started = time.monotonic()
    with pytest.raises(LoopStopped):
        wait_on_loop(loop, never())
    assert time.monotonic() - started < 5
    thread.join(5)
    loop.run_until_complete(asyncio.sleep(0.01))  # let the cancelled coroutine go, as a closing loop would
    loop.close()
    with pytest.raises(LoopStopped):  # a closed loop, at once
        wait_on_loop(loop, answer())
