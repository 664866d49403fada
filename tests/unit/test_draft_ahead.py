"""The draft Scout drafter's bookkeeping, against a stand-in Scout that keeps its cache exactly as
scout/draft_model.py does: drafts requested ahead are used only when their guess came true, and
what the Oracle believes the Scout's cache holds is always what it holds."""

from __future__ import annotations

import asyncio
import threading

import pytest

from oracle.engine.sampler import SamplingParams
from oracle.swarm.draft import ScoutDrafter
from shard_common.protocol import Drafted

VOCAB = 100


def model(t: int) -> int:
    """The stand-in's (and the 'target's') greedy next token."""
    return (3 * t + 1) % VOCAB


class StandInScout:
    def __init__(self):
        self.cache: list[int] = []
        self.requests: list[tuple[int, int]] = []  # (start, tokens sent)
        self.dead = False
        self.address = type("A", (), {"peer_id": "stand-in"})()

    async def draft(self, request, timeout: float) -> Drafted:
        assert request.start <= len(self.cache), "the Oracle thought the cache held more than it does"
        self.requests.append((request.start, len(request.tokens)))
        self.cache = self.cache[:request.start] + list(request.tokens)
        out, last = [], self.cache[-1]
        for _ in range(request.k):
            last = model(last)
            out.append(last)
        self.cache += out[:-1]
        return Drafted(tokens=out)

    async def free(self, session: str) -> None:
        self.cache = []


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=100)


def test_drafts_ahead_are_used_when_the_guess_comes_true_and_the_cache_is_tracked(loop):
    scout = StandInScout()
    drafter = ScoutDrafter(lambda: [scout], loop, VOCAB)
    tokens = [5, 7]
    for _ in range(4):  # every draft accepted, and the target's own token is the model's: guesses come true
        draft = drafter.propose("s", tokens, 4, greedy())
        expected = []
        last = tokens[-1]
        for _ in range(4):
            last = model(last)
            expected.append(last)
        assert draft.tokens == expected
        tokens = tokens + draft.tokens + [model(draft.tokens[-1])]
    assert drafter.drafted_ahead == 4 and drafter.ahead_used == 3
    drafter.ahead["s"][2].result(timeout=5)  # the last one, still in flight
    # After the first request, each step's draft was asked for with one token (the guess).
    assert [n for _, n in scout.requests[1:]] == [1, 1, 1, 1]


def test_a_wrong_guess_is_dropped_and_the_next_draft_starts_from_the_truth(loop):
    scout = StandInScout()
    drafter = ScoutDrafter(lambda: [scout], loop, VOCAB)
    tokens = [5, 7]
    draft = drafter.propose("s", tokens, 4, greedy())
    tokens = tokens + draft.tokens[:2] + [42]  # two accepted, then the target chose another token
    draft = drafter.propose("s", tokens, 4, greedy())
    assert drafter.ahead_used == 0
    last, expected = 42, []
    for _ in range(4):
        last = model(last)
        expected.append(last)
    assert draft.tokens == expected
    # The Scout's cache is what the drafter believes it is: the truth up to the wrong guess.
    assert scout.cache[:len(drafter.held["s"])] == drafter.held["s"]
    drafter.release("s")
    assert "s" not in drafter.ahead and "s" not in drafter.held


def test_sampled_sessions_never_draft_ahead(loop):
    scout = StandInScout()
    drafter = ScoutDrafter(lambda: [scout], loop, VOCAB)
    drafter.propose("s", [5, 7], 4, SamplingParams(temperature=0.8, max_tokens=100, seed=1))
    assert drafter.drafted_ahead == 0 and scout.requests == [(0, 2)]
