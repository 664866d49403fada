"""Run tensor work on the process's main thread while the event loop lives in another.

Measured here: the same decode steps run 2-2.5x slower when torch is called from a worker thread
than from the main thread (OpenMP's worker team wakes up slowly for a non-main master thread),
so the servers keep the main thread for the model and give the event loop a thread of its own.

Work that waits on the network between its tensor parts (an engine step through Scouts) is written
as a *resumable*: a generator that yields a ``Waiting`` wherever it waits. ``drive`` runs one to
the end on the calling thread; ``MainThreadExecutor.submit_resumable`` interleaves several on the
main thread, resuming each when what it waits for is done — so one pipelined micro-batch's tensor
work runs while another's waits on a Scout.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Awaitable, Callable, Coroutine, Generator, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


@dataclass
class Waiting:
    """What a resumable waits for: ``future``, running on ``loop`` (another thread's)."""

    loop: asyncio.AbstractEventLoop
    future: Future

    def result(self):
        return wait_for_future(self.loop, self.future)


Resumable = Generator[Waiting, object, T]


def _resume(resumable: Resumable, outcome: Callable[[], object] | None) -> Waiting:
    """Hand ``resumable`` what it waited for — ``outcome()``'s value, or its error, which the
    resumable decides about — and return its next wait (StopIteration once it is done)."""
    if outcome is None:
        return resumable.send(None)
    try:
        value = outcome()
    except BaseException as e:
        return resumable.throw(e)
    return resumable.send(value)


def drive(resumable: Resumable[T]) -> T:
    """Run ``resumable`` to the end on this thread, waiting wherever it waits."""
    outcome = None
    while True:
        try:
            outcome = _resume(resumable, outcome).result
        except StopIteration as done:
            return done.value


def submit_resumable(executor: Executor, resumable: Resumable[T]) -> Future:
    """Run ``resumable`` on ``executor``: interleaved with others on a MainThreadExecutor, to the
    end in one call on any other executor."""
    if isinstance(executor, MainThreadExecutor):
        return executor.submit_resumable(resumable)
    return executor.submit(drive, resumable)


class MainThreadExecutor(Executor):
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError("executor is shut down")
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def submit_resumable(self, resumable: Resumable[T]) -> Future:
        """Run ``resumable`` on the main thread, in turns with other calls and resumables: it
        gives the thread up wherever it waits and is resumed when that wait is over."""
        if self._closed:
            raise RuntimeError("executor is shut down")
        future: Future = Future()
        self._queue.put((None, self._advance, (future, resumable, None), {}))
        return future

    def _advance(self, future: Future, resumable: Resumable, waited: Future | None) -> None:
        if waited is None and not future.set_running_or_notify_cancel():
            resumable.close()  # cancelled before its first turn
            return
        try:
            waiting = _resume(resumable, waited.result if waited is not None else None)
        except StopIteration as done:
            future.set_result(done.value)
            return
        except BaseException as e:  # handed to the awaiting coroutine, which decides
            future.set_exception(e)
            return
        waiting.future.add_done_callback(lambda f: self._queue.put((None, self._advance, (future, resumable, f), {})))

    def run_until(self, done: threading.Event, poll_seconds: float = 0.05) -> None:
        """Serve submitted calls on the calling (main) thread until ``done`` is set."""
        while not done.is_set():
            try:
                future, fn, args, kwargs = self._queue.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            if future is None:  # a resumable's next turn; it settles its own future
                fn(*args, **kwargs)
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine, which decides
                future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True


class LoopStopped(RuntimeError):
    """The event loop this thread was waiting on has stopped: the process is shutting down."""


def wait_on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[object, object, T], poll_seconds: float = 0.25) -> T:
    """Run ``coro`` on ``loop`` (another thread's) and wait for its result. Unlike
    ``run_coroutine_threadsafe(...).result()`` this never waits on a loop that has stopped: a
    coroutine scheduled on a loop that stops before running it would leave the caller (the
    main thread, which the stop itself waits for) waiting forever."""
    return wait_for_future(loop, start_on_loop(loop, coro), poll_seconds)


def start_on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[object, object, T]) -> Future:
    """Start ``coro`` on ``loop`` and return at once (this thread works meanwhile; then
    ``wait_for_future``)."""
    try:
        return asyncio.run_coroutine_threadsafe(coro, loop)
    except RuntimeError:  # the loop is closed
        coro.close()
        raise LoopStopped("the event loop has stopped") from None


def wait_for_future(loop: asyncio.AbstractEventLoop, future: Future, poll_seconds: float = 0.25):
    """The result of ``future`` (started by ``start_on_loop``), unless ``loop`` stops first."""
    while True:
        try:
            return future.result(timeout=poll_seconds)
        except FutureTimeout:
            if future.done():  # its own result is a TimeoutError (asyncio.wait_for timed out), not our poll
                raise
            if loop.is_closed() or not loop.is_running():
                future.cancel()
                raise LoopStopped("the event loop has stopped") from None


def run_servers(main: Callable[[asyncio.Event, threading.Event], Awaitable[None]], executor: MainThreadExecutor,
                name: str = "server", loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Run ``main(stop, ready)`` on ``loop`` (a new one by default) in its own thread while this
    (main) thread serves ``executor``. SIGINT/SIGTERM set ``stop``; ``main`` sets ``ready`` once
    listening."""
    loop = loop or asyncio.new_event_loop()
    stop = asyncio.Event()
    ready, finished = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def loop_thread() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main(stop, ready))
        except BaseException as e:
            errors.append(e)
        finally:
            try:
                loop.close()
            finally:
                finished.set()  # whatever happened above, the main thread must not wait forever

    def request_stop(signum, _frame) -> None:
        if finished.is_set() or loop.is_closed():
            return  # a second signal while already stopping (Ctrl-C reaches the whole process group)
        log.warning("%s received %s: finishing in-flight work, then stopping", name, signal.Signals(signum).name)
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop closed between the check and the call
            pass

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    threading.Thread(target=loop_thread, name="event-loop", daemon=True).start()
    executor.run_until(finished)
    if errors:
        log.error("%s stopped with an error: %r", name, errors[0])
        return 1
    return 0
