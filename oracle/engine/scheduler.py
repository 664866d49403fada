"""Continuous batching on the event loop's side: requests join and leave the running batch
between steps; steps run on the engine's thread so the server stays responsive.

Pipelined micro-batches: the running jobs are split into lanes, as many as the pipeline's depth
(with Scouts, one more than the hops of a route: the Oracle's own head is a stage too), and each
lane steps on its own, so while one lane's hidden states are on the second Scout another's are
on the first. A sequence belongs to one lane and its next step still waits for its previous one:
the gain is aggregate throughput, never reordered output."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from shard_common.main_thread import submit_resumable

from .engine import Engine
from .sequence import Sequence, TokenEvent

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The queue is full, or the scheduler is shutting down."""


class GenerationFailed(RuntimeError):
    def __init__(self, message: str, code: str = "generation_failed"):
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    """One request: its sequences (n choices) and a queue of (choice index, event) for its handler."""

    seqs: list[Sequence]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    lane: int = 0  # the micro-batch it steps in
    # Every event of the job is in ``events``: set by the scheduler when it retires the job. Its
    # sequences count as finished earlier — on the engine's thread, before that step's events (or a
    # failure) are queued — so a reader that stopped at ``finished`` could miss the last of them.
    delivered: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


@dataclass
class LaneStep:
    """One lane's step in flight: the jobs it holds and the sequences it steps."""

    lane: int
    jobs: list[Job]
    batch: list[Sequence]
    future: asyncio.Future


class Scheduler:
    def __init__(self, engine: Engine, max_running: int = 32, max_queued: int = 256, executor: Executor | None = None):
        self.engine = engine
        self.max_running = max_running
        self.max_queued = max_queued
        self.waiting: list[Job] = []
        self.running: list[Job] = []
        self.closing = False
        self.steps = 0
        self.tokens_generated = 0
        self._wakeup = asyncio.Event()
        # One step at a time: the engine and its caches are not thread-safe. Servers pass a
        # MainThreadExecutor (see main_thread.py for why).
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task | None = None
        self._inflight: dict[int, LaneStep] = {}  # lane → its step now running
        self.on_step: Callable[[int], None] | None = None  # told each step's batch size (metrics)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="scheduler")

    @property
    def running_sequences(self) -> int:
        return sum(len(j.seqs) for j in self.running)

    def submit(self, seqs: list[Sequence]) -> Job:
        if self.closing:
            raise Overloaded("the server is shutting down")
        if len(self.waiting) >= self.max_queued:
            raise Overloaded(f"{len(self.waiting)} requests are already waiting")
        job = Job(seqs)
        self.waiting.append(job)
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: stop its sequences at the next step boundary."""
        job.cancelled = True
        if job in self.waiting:
            self.waiting.remove(job)
        self._wakeup.set()

    async def close(self, drain_seconds: float = 10.0) -> None:
        """Stop admitting; let running jobs finish for up to ``drain_seconds``, then end them with an error."""
        self.closing = True
        for job in self.waiting:
            job.events.put_nowait(GenerationFailed("the server is shutting down"))
        self.waiting.clear()
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_seconds)
            except asyncio.TimeoutError:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
                # A step may still be waiting on a Scout that froze: make it fail now, or the
                # releases below would queue behind it for as long as the Scout stays silent.
                self.engine.pipeline.abort()
                for job in self.running:
                    job.events.put_nowait(GenerationFailed("the server shut down before this request finished"))
                await self._release(self.running)
                self.running.clear()
        self._executor.shutdown(wait=True)

    def _admit(self) -> None:
        if not self.waiting:
            return
        depth = max(1, self.engine.pipeline.depth())
        while self.waiting and (not self.running or self.running_sequences + len(self.waiting[0].seqs) <= self.max_running):
            job = self.waiting.pop(0)
            load = {lane: 0 for lane in range(depth)}
            for j in self.running:
                if j.lane in load:
                    load[j.lane] += len(j.seqs)
            job.lane = min(load, key=lambda lane: (load[lane], lane))
            self.running.append(job)

    async def _release(self, jobs: list[Job]) -> None:
        """Free the jobs' caches on the engine's thread: with Scouts that is network work that
        needs this event loop free."""
        seqs = [s for job in jobs for s in job.seqs]
        if seqs:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._release_now, seqs)

    def _release_now(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            try:
                self.engine.release(s)
            except Exception:  # a Scout that is gone has nothing left to free
                log.warning("could not free %s", s.session, exc_info=True)

    async def _retire(self) -> None:
        """Jobs that are over leave (not while their lane's step runs: it still holds them)."""
        done = [job for job in self.running if (job.cancelled or job.finished) and job.lane not in self._inflight]
        for job in done:
            self.running.remove(job)
            job.delivered = True
        await self._release(done)

    def _start_steps(self) -> None:
        for lane in sorted({j.lane for j in self.running} - set(self._inflight)):
            jobs = [j for j in self.running if j.lane == lane]
            batch = [s for j in jobs for s in j.seqs if not s.finished]
            if batch:
                future = asyncio.wrap_future(submit_resumable(self._executor, self.engine.resumable_step(batch)))
                self._inflight[lane] = LaneStep(lane, jobs, batch, future)

    async def _loop(self) -> None:
        waker: asyncio.Task | None = None
        try:
            while True:
                await self._retire()
                self._admit()
                self._start_steps()
                if not self._inflight:
                    if self.closing and not self.running:
                        return
                    if not self.running:
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    continue
                if waker is None:  # a job that arrives may fill a lane with no step running
                    self._wakeup.clear()
                    waker = asyncio.ensure_future(self._wakeup.wait())
                done, _ = await asyncio.wait([*(s.future for s in self._inflight.values()), waker],
                                             return_when=asyncio.FIRST_COMPLETED)
                if waker in done:
                    waker = None
                for step in [s for s in self._inflight.values() if s.future in done]:
                    del self._inflight[step.lane]
                    self._finish(step)
        finally:
            if waker is not None:
                waker.cancel()

    def _finish(self, step: LaneStep) -> None:
        """Hand a lane's step's events to its jobs; a failed step fails its own jobs only."""
        owner = {id(s): (j, i) for j in step.jobs for i, s in enumerate(j.seqs)}
        e = step.future.exception()
        if e is not None:  # one bad step must not kill the server
            log.error("engine step failed for %d sequences", len(step.batch), exc_info=e)
            for job in step.jobs:
                for s in job.seqs:
                    s.abort("error")
                # Errors may name their API code (a swarm with no route left says "no_route").
                job.events.put_nowait(GenerationFailed(str(e), getattr(e, "api_code", "generation_failed")))
            return
        events: list[tuple[Sequence, TokenEvent]] = step.future.result()
        self.steps += 1
        self.tokens_generated += len(events)
        if self.on_step is not None:
            self.on_step(len(step.batch))
        for seq, event in events:
            job, index = owner[id(seq)]
            if not job.cancelled:
                job.events.put_nowait((index, event))
