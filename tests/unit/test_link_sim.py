"""The simulated WAN link (benchmarks only): a frame arrives its one-way delay later, the sender
is not held up, frames stay in order, and a bandwidth cap queues them."""

from __future__ import annotations

import asyncio
import time

import pytest

from shard_common.link_sim import LINK
from shard_common.protocol import Kind, Ping
from shard_common.wire import read_frame, write_frame


async def arrivals(frames: int, body: bytes = b"") -> tuple[float, list[tuple[float, int]]]:
    """(how long sending took, [(arrival after the first send, id)]) over a loopback connection."""
    received: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def handle(reader, writer):
        for _ in range(frames):
            _, message, _ = await read_frame(reader)
            received.append((time.perf_counter(), message.id))
        done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    t0 = time.perf_counter()
    for i in range(frames):
        await write_frame(writer, Kind.PING, Ping(id=i), body)
    sent = time.perf_counter() - t0
    await asyncio.wait_for(done.wait(), 10)
    writer.close()
    server.close()
    return sent, [(t - t0, i) for t, i in received]


@pytest.fixture
def link():
    yield LINK
    LINK.configure()


def test_frames_arrive_a_one_way_delay_later_in_order_without_holding_the_sender(link):
    link.configure(delay_ms=80, jitter_ms=20)
    sent, got = asyncio.run(arrivals(5))
    assert sent < 0.05  # the sender went on at once
    assert [i for _, i in got] == list(range(5))
    assert all(0.075 <= t < 0.5 for t, _ in got)


def test_a_bandwidth_cap_queues_frames_behind_each_other(link):
    link.configure(mbit_per_s=8)  # 1 MB/s: 100 kB frames take 0.1 s each
    _, got = asyncio.run(arrivals(3, b"x" * 100_000))
    assert got[-1][0] >= 0.28


def test_no_simulation_by_default_and_no_negative_links(link):
    assert not link.active
    with pytest.raises(ValueError):
        link.configure(delay_ms=-1)
