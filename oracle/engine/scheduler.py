"""Continuous batching on the event loop's side: requests join and leave the running batch
between steps; each step runs in one worker thread so the server stays responsive."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

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
    # Every event of the job is in ``events``: set by the scheduler when it retires the job. Its
    # sequences count as finished earlier — on the engine's thread, before that step's events (or a
    # failure) are queued — so a reader that stopped at ``finished`` could miss the last of them.
    delivered: bool = False

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


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
        while self.waiting and (not self.running or self.running_sequences + len(self.waiting[0].seqs) <= self.max_running):
            self.running.append(self.waiting.pop(0))

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
        done = [job for job in self.running if job.cancelled or job.finished]
        for job in done:
            self.running.remove(job)
            job.delivered = True
        await self._release(done)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._retire()
            self._admit()
            if not self.running:
                if self.closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [s for j in self.running for s in j.seqs if not s.finished]
            owner = {id(s): (j, i) for j in self.running for i, s in enumerate(j.seqs)}
            try:
                events: list[tuple[Sequence, TokenEvent]] = await loop.run_in_executor(self._executor, self.engine.step, batch)
            except Exception as e:  # one bad step must not kill the server: fail this batch only
                log.exception("engine step failed for %d sequences", len(batch))
                for job in self.running:
                    for s in job.seqs:
                        s.abort("error")
                    # Errors may name their API code (a swarm with no route left says "no_route").
                    job.events.put_nowait(GenerationFailed(str(e), getattr(e, "api_code", "generation_failed")))
                continue
            self.steps += 1
            self.tokens_generated += len(events)
            if self.on_step is not None:
                self.on_step(len(batch))
            for seq, event in events:
                job, index = owner[id(seq)]
                if not job.cancelled:
                    job.events.put_nowait((index, event))
