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
