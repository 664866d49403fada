import threading

import pytest

from shard_common.main_thread import MainThreadExecutor


def test_calls_run_on_the_serving_thread_and_errors_propagate():
    ex = MainThreadExecutor()
    done = threading.Event()
    results = {}

    def client():
        results["thread"] = ex.submit(threading.current_thread).result()
        with pytest.raises(ZeroDivisionError):
            ex.submit(lambda: 1 / 0).result()
        results["sum"] = ex.submit(sum, [1, 2, 3]).result()
        done.set()

    threading.Thread(target=client).start()
    ex.run_until(done)
    assert results == {"thread": threading.main_thread(), "sum": 6}
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(sum, [])


def test_resumables_take_turns_on_the_main_thread_while_they_wait():
    """Two resumables waiting on an event loop's work: while one waits the other runs, each runs
    only on the serving thread, results and errors come back, and a cancelled one never starts."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from shard_common.main_thread import Waiting, submit_resumable

    ex, loop = MainThreadExecutor(), asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    trace = []

    async def network(name, seconds):
        await asyncio.sleep(seconds)
        return name

    def step(name, seconds, fail=False):
        trace.append((name, "start", threading.current_thread() is threading.main_thread()))
        got = yield Waiting(loop, asyncio.run_coroutine_threadsafe(network(name, seconds), loop))
        trace.append((got, "resumed", threading.current_thread() is threading.main_thread()))
        if fail:
            raise ValueError(name)
        try:
            yield Waiting(loop, asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.sleep(5), 0.01), loop))
        except asyncio.TimeoutError:
            return name + " done"

    done, results = threading.Event(), {}

    def client():
        slow, fast = ex.submit_resumable(step("slow", 0.3)), ex.submit_resumable(step("fast", 0.05, fail=True))
        never = ex.submit_resumable(step("never", 0))
        never.cancel()  # queued, not started yet
        results["slow"] = slow.result(10)
        results["fast"] = repr(fast.exception(10))
        results["cancelled"] = never.cancelled()
        done.set()

    threading.Thread(target=client).start()
    ex.run_until(done)
    assert results == {"slow": "slow done", "fast": "ValueError('fast')", "cancelled": True}
    assert [t[:2] for t in trace] == [("slow", "start"), ("fast", "start"), ("fast", "resumed"), ("slow", "resumed")]
    assert all(on_main for _, _, on_main in trace)
    # Any other executor runs a resumable to the end in one call.
    with ThreadPoolExecutor(1) as pool:
        assert submit_resumable(pool, step("pooled", 0.01)).result(10) == "pooled done"
    loop.call_soon_threadsafe(loop.stop)
