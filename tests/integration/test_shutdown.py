"""A stop never waits on a dead Redis: an Oracle whose Redis went away still stops within seconds
of SIGTERM (seen before: an Oracle sharing another's embedded Redis, which died first, hung)."""

from __future__ import annotations

import signal
import time

from oracle.swarm.local_scouts import LocalScout

from .conftest import ADMIN_KEY, OracleProcess, client


def test_sigterm_stops_an_oracle_whose_embedded_redis_died_with_another_oracle(tmp_path, model_id):
    owner = OracleProcess(tmp_path)  # starts the embedded Redis in tmp_path/redis
    sharer = OracleProcess(tmp_path)  # same data dir: uses the Redis already running there
    try:
        question = dict(model=model_id, messages=[{"role": "user", "content": "Name three colors."}], max_tokens=4)
        client(sharer.url, ADMIN_KEY).chat.completions.create(**question)
        owner.stop()  # its embedded Redis goes with it
        started = time.monotonic()
        sharer.proc.send_signal(signal.SIGTERM)
        sharer.proc.wait(timeout=30)
        assert time.monotonic() - started < 20
    finally:
        sharer.stop()
        owner.stop()


def test_sigterm_stops_an_oracle_waiting_on_a_scout_that_froze(tmp_path_factory, tmp_path, model_id):
    """A Scout freezes mid-stream (SIGSTOP: its connection stays open, nothing answers) under a
    long --hop-timeout; the stop must wait neither for it nor for a step that calls into the
    event loop after the loop has stopped."""
    scout = LocalScout((0, 30), tmp_path_factory.mktemp("frozen"), ["--threads", "1"])
    try:
        oracle = OracleProcess(tmp_path, "--scouts", str(scout.address), "--hop-timeout", "300", "--no-audits")
        try:
            stream = client(oracle.url, ADMIN_KEY).chat.completions.create(
                model=model_id, messages=[{"role": "user", "content": "Count to one thousand."}], max_tokens=2000,
                stream=True, extra_body={"ignore_eos": True})
            for i, _ in enumerate(stream):
                if i == 3:
                    break
            scout.proc.send_signal(signal.SIGSTOP)
            time.sleep(1)
            started = time.monotonic()
            oracle.proc.send_signal(signal.SIGTERM)
            oracle.proc.wait(timeout=60)
            assert time.monotonic() - started < 25  # aiohttp gives in-flight requests 15 s, then it must go
        finally:
            oracle.stop()
    finally:
        scout.proc.send_signal(signal.SIGCONT)
        scout.stop()
