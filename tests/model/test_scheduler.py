"""The continuous-batching scheduler in-process, with the real engine."""

from __future__ import annotations

import asyncio

import pytest

from oracle.engine.sampler import SamplingParams
from oracle.engine.scheduler import Overloaded, Scheduler
from oracle.engine.sequence import Sequence


def seq(engine, tokenizer, text="Say hello.", **params):
    ids = tokenizer.encode_chat([{"role": "user", "content": text}])
    return Sequence(ids, SamplingParams(**{"max_tokens": 8, "temperature": 0, **params}), tokenizer, engine.context_length)


async def drain(job):
    events = []
    while not job.finished:
        events.append(await asyncio.wait_for(job.events.get(), 60))
    return events


def test_jobs_share_steps_and_finish(engine, tokenizer):
    async def main():
        sched = Scheduler(engine, max_running=8)
        sched.start()
        jobs = [sched.submit([seq(engine, tokenizer, t)]) for t in ("Say hello.", "Name a color.", "Count to three.")]
        results = await asyncio.gather(*[drain(j) for j in jobs])
        steps = sched.steps
        await sched.close()
        return jobs, results, steps

    jobs, results, steps = asyncio.run(main())
    assert all(j.finished for j in jobs)
    tokens = sum(len(r) for r in results)
    assert steps < tokens  # sequences were batched together
    assert engine.pipeline.local.kv.sessions == {}  # every cache was freed


def test_queue_limit_and_shutdown_refuse_work(engine, tokenizer):
    async def main():
        sched = Scheduler(engine, max_running=1, max_queued=2)
        # Not started: nothing is admitted, so the queue fills.
        sched.submit([seq(engine, tokenizer)])
        sched.submit([seq(engine, tokenizer)])
        with pytest.raises(Overloaded):
            sched.submit([seq(engine, tokenizer)])
        sched.start()
        await sched.close(drain_seconds=30)
        with pytest.raises(Overloaded, match="shutting down"):
            sched.submit([seq(engine, tokenizer)])

    asyncio.run(main())


def test_cancel_frees_the_slot_and_caches(engine, tokenizer):
    async def main():
        sched = Scheduler(engine)
        sched.start()
        job = sched.submit([seq(engine, tokenizer, "Write a long story.", max_tokens=500, ignore_eos=True)])
        await asyncio.wait_for(job.events.get(), 60)
        sched.cancel(job)
        for _ in range(100):
            if not sched.running:
                break
            await asyncio.sleep(0.05)
        running = len(sched.running)
        await sched.close()
        return running

    assert asyncio.run(main()) == 0
    assert engine.pipeline.local.kv.sessions == {}
