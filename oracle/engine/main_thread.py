"""Run tensor work on the process's main thread while the event loop lives in another.

Measured here: the same decode steps run 2-2.5x slower when torch is called from a worker thread
than from the main thread (OpenMP's worker team wakes up slowly for a non-main master thread),
so the servers keep the main thread for the model and give the event loop a thread of its own.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future


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

    def run_until(self, done: threading.Event, poll_seconds: float = 0.05) -> None:
        """Serve submitted calls on the calling (main) thread until ``done`` is set."""
        while not done.is_set():
            try:
                future, fn, args, kwargs = self._queue.get(timeout=poll_seconds)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting coroutine, which decides
                future.set_exception(e)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
