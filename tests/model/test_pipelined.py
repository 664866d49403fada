"""Pipelined micro-batches: the scheduler keeps several lanes' steps in flight through hops that
answer on an event loop (as Scouts do), interleaved on the main thread. Greedy outputs are the
ones each prompt gets alone, whatever the lanes' composition, through a failover too."""

from __future__ import annotations

import asyncio
import threading

from oracle.engine.engine import Engine
from oracle.engine.sampler import SamplingParams
from oracle.engine.scheduler import Scheduler
from oracle.engine.sequence import Sequence
from oracle.engine.scheduler import GenerationFailed
from oracle.swarm.connection import ScoutError, ScoutUnreachable
from oracle.swarm.local_hop import LocalHop
from oracle.swarm.runner import SwarmPipeline
from oracle.trust.health import PeerHealth
from shard_common.main_thread import MainThreadExecutor
from shard_common.model.span import Span

PROMPTS = ["Write a short poem about the sea.", "Name three colors.", "What is the capital of France?",
           "Count from one to ten.", "Say hello in French.", "Why is the sky blue?"]


class Overlap:
    """How many forwards are in flight at once, across all hops."""

    def __init__(self):
        self.now = self.most = 0


class AsyncHop(LocalHop):
    """Blocks computed in this process but answered on the event loop after a pause, like a
    Scout's round trip, so other lanes' steps run meanwhile; may die after some forwards."""

    local = False

    def __init__(self, weights, runtime, start, end, name, overlap: Overlap, dies_after=None, refuses=frozenset()):
        super().__init__(Span(weights, start, end, runtime), peer_id=name)
        self.overlap = overlap
        self.dies_after = dies_after
        self.refuses = refuses  # sessions whose forwards it answers with an error
        self.forwards = 0
        self.dead = False
        self.lock = asyncio.Lock()  # one request at a time, as on a Scout connection

    async def forward(self, hidden, requests, dtype="float32", ops=None):
        async with self.lock:
            self.forwards += 1
            if self.dies_after is not None and self.forwards > self.dies_after:
                self.dead = True
            if self.dead:
                raise ScoutUnreachable(f"{self.peer_id} is gone")
            if any(r.session in self.refuses for r in requests):
                raise ScoutError(f"{self.peer_id}: this request is refused")
            self.overlap.now += 1
            self.overlap.most = max(self.overlap.most, self.overlap.now)
            try:
                await asyncio.sleep(0.02)
                return LocalHop.forward(self, hidden, requests, dtype, ops)
            finally:
                self.overlap.now -= 1

    async def cache(self, ops):
        async with self.lock:
            LocalHop.cache(self, ops)

    def abort(self):
        self.dead = True


def new_sequence(engine, tokenizer, prompt):
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    return Sequence(ids, SamplingParams(max_tokens=16, temperature=0), tokenizer, engine.context_length)


def alone(engine, tokenizer, prompt):
    seq = new_sequence(engine, tokenizer, prompt)
    list(engine.generate([seq]))
    return [c.token for c in seq.output]


def through_scheduler(make_engine, tokenizer, prompts, before_start=None):
    """Serve ``prompts`` at once as the Oracle does: the scheduler on an event loop thread, steps
    on this (main) thread through a MainThreadExecutor. ``before_start`` sees the sequences first."""
    executor, loop = MainThreadExecutor(), asyncio.new_event_loop()
    engine = make_engine(loop)
    finished, out = threading.Event(), {}

    async def main():
        scheduler = Scheduler(engine, max_running=16, executor=executor)
        seqs = [new_sequence(engine, tokenizer, p) for p in prompts]
        if before_start is not None:
            before_start(seqs)
        jobs = [scheduler.submit([s]) for s in seqs]
        scheduler.start()
        out["failed"] = set()
        deadline = loop.time() + 120
        for i, job in enumerate(jobs):
            while not (job.delivered and job.events.empty()):  # as the API reads a job's events
                assert loop.time() < deadline
                try:
                    if isinstance(await asyncio.wait_for(job.events.get(), 0.5), GenerationFailed):
                        out["failed"].add(i)
                except asyncio.TimeoutError:
                    continue
        out["lanes"] = [job.lane for job in jobs]
        out["tokens"] = [[c.token for c in job.seqs[0].output] for job in jobs]
        await scheduler.close()

    def run_loop():
        try:
            loop.run_until_complete(main())
        except BaseException as e:
            out["error"] = e
        finally:
            finished.set()

    threading.Thread(target=run_loop, daemon=True).start()
    executor.run_until(finished)
    if "error" in out:
        raise out["error"]
    return engine, out


def test_pipelined_lanes_give_each_prompt_its_tokens_alone(weights, tokenizer, quant_parts, engine):
    runtime, _, ends = quant_parts
    expected = [alone(engine, tokenizer, p) for p in PROMPTS]
    for depth in (1, 3):
        overlap = Overlap()
        hops = [AsyncHop(weights, runtime, 0, 15, "a", overlap), AsyncHop(weights, runtime, 15, 30, "b", overlap)]
        routed, out = through_scheduler(
            lambda loop: Engine(ends, SwarmPipeline(lambda: hops, 30, loop, PeerHealth(), depth=depth), tokenizer), tokenizer, PROMPTS)
        assert out["tokens"] == expected, f"depth {depth}"
        assert len(set(out["lanes"])) == depth
        assert overlap.most == depth if depth == 1 else overlap.most >= 2  # lanes really were in flight together
        assert all(h.local.kv.sessions == {} for h in hops) and routed.pipeline.routes == {}


def test_a_hop_dying_under_several_lanes_changes_no_token(weights, tokenizer, quant_parts, engine):
    """Both lanes run through the doomed hop (its replica appears only once it is dead); the lane
    that finds it dead repairs the route for all, the other goes on from the first hop that changed."""
    runtime, _, ends = quant_parts
    expected = [alone(engine, tokenizer, p) for p in PROMPTS[:4]]
    overlap = Overlap()
    hops = [AsyncHop(weights, runtime, 0, 15, "a", overlap), AsyncHop(weights, runtime, 15, 30, "doomed", overlap, dies_after=8),
            AsyncHop(weights, runtime, 15, 30, "replica", overlap)]
    pipeline = None

    def make(loop):
        nonlocal pipeline
        pipeline = SwarmPipeline(lambda: hops[:2] if not hops[1].dead else [hops[0], hops[2]], 30, loop, PeerHealth(), depth=2)
        return Engine(ends, pipeline, tokenizer)

    _, out = through_scheduler(make, tokenizer, PROMPTS[:4])
    assert out["tokens"] == expected
    assert set(out["lanes"]) == {0, 1} and hops[1].dead and hops[2].forwards > 0 and pipeline.failovers == 1
    assert all(h.local.kv.sessions == {} for h in (hops[0], hops[2])) and pipeline.routes == {} and pipeline.stale == set()


def test_a_failed_step_fails_only_its_own_lane(weights, tokenizer, quant_parts, engine):
    """A Scout refuses one session's forwards: the jobs stepping in that session's lane get an
    error, the other lane's jobs finish with their tokens."""
    runtime, _, ends = quant_parts
    expected = [alone(engine, tokenizer, p) for p in PROMPTS[:4]]
    refused: set[str] = set()
    overlap = Overlap()
    hops = [AsyncHop(weights, runtime, 0, 15, "a", overlap), AsyncHop(weights, runtime, 15, 30, "b", overlap, refuses=refused)]

    def make(loop):
        return Engine(ends, SwarmPipeline(lambda: hops, 30, loop, PeerHealth(), depth=2), tokenizer)

    _, out = through_scheduler(make, tokenizer, PROMPTS[:4], lambda seqs: refused.add(seqs[1].session))
    bad_lane = out["lanes"][1]
    assert out["failed"] == {i for i, lane in enumerate(out["lanes"]) if lane == bad_lane} and 0 not in out["failed"]
    for i in set(range(4)) - out["failed"]:
        assert out["tokens"][i] == expected[i]
