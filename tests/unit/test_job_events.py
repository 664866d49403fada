"""A request handler reads every event of its job, the last ones and a failure included."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from oracle.api.errors import APIError
from oracle.api.generation import job_events
from oracle.engine.scheduler import GenerationFailed, Job


def test_a_failure_queued_after_the_sequences_finished_still_reaches_the_client():
    """The scheduler aborts a failed step's sequences (they count as finished at once) and queues
    the failure right after; a handler that stopped at "finished" answered 200 with nothing."""
    job = Job(seqs=[SimpleNamespace(finished=True, prompt_ids=[1], output=[])])
    request = SimpleNamespace(transport=SimpleNamespace(is_closing=lambda: False))

    async def main():
        async def read():
            return [item async for item in job_events(job, request, scheduler=None)]

        reader = asyncio.get_running_loop().create_task(read())
        await asyncio.sleep(0.05)
        job.events.put_nowait(GenerationFailed("no route through the swarm", "no_route"))
        job.delivered = True
        with pytest.raises(APIError) as e:
            await reader
        return e.value

    err = asyncio.run(main())
    assert err.status == 503 and err.body()["error"]["code"] == "no_route"


def test_events_queued_before_delivery_are_all_read():
    job = Job(seqs=[SimpleNamespace(finished=True, prompt_ids=[1], output=[1, 2])])
    request = SimpleNamespace(transport=SimpleNamespace(is_closing=lambda: False))
    for i in range(3):
        job.events.put_nowait((0, SimpleNamespace(token=i)))
    job.delivered = True

    async def main():
        return [item async for item in job_events(job, request, scheduler=None)]

    assert [event.token for _, event in asyncio.run(main())] == [0, 1, 2]
