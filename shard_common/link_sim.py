"""A simulated WAN link, for benchmarks only (this machine's kernel has no netem to delay packets).

Every data-plane frame a process sends is handed to the socket ``delay`` later (plus up to
``jitter``), after queueing behind the frames before it at ``bandwidth``, without blocking the
sender: a one-way delay per link, so a topology pays for exactly the trips it makes (a hub step
through n Scouts costs 2n one-way delays, a chain n + 1). Frames on one connection stay in order.
Set by ``--simulate-link-ms`` (``SHARD_SIMULATE_LINK_MS``) on the Oracle and on Scouts.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import weakref

from .settings import add_option


class LinkSimulation:
    def __init__(self):
        self.delay_s = self.jitter_s = 0.0
        self.bytes_per_s = 0.0
        self._free_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # writer → when its link is free
        self._last_due: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # writer → its last frame's arrival
        self._random = random.Random()

    def configure(self, delay_ms: float = 0.0, jitter_ms: float = 0.0, mbit_per_s: float = 0.0) -> None:
        if min(delay_ms, jitter_ms, mbit_per_s) < 0:
            raise ValueError("a simulated link's delay, jitter and bandwidth cannot be negative")
        self.delay_s, self.jitter_s = delay_ms / 1000, jitter_ms / 1000
        self.bytes_per_s = mbit_per_s * 1e6 / 8

    @property
    def active(self) -> bool:
        return bool(self.delay_s or self.jitter_s or self.bytes_per_s)

    def send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Hand ``data`` to ``writer`` once the simulated link has carried it."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._free_at.get(writer, now))
        done = start + (len(data) / self.bytes_per_s if self.bytes_per_s else 0.0)
        self._free_at[writer] = done
        # Strictly after the previous frame: the event loop does not keep timers of equal times in order.
        due = max(done + self.delay_s + self._random.uniform(0.0, self.jitter_s), self._last_due.get(writer, 0.0) + 1e-6)
        self._last_due[writer] = due
        loop.call_at(due, _deliver, writer, data)


def _deliver(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


LINK = LinkSimulation()


def add_link_options(p: argparse.ArgumentParser) -> None:
    add_option(p, "--simulate-link-ms", default=0.0, type=float,
               help="benchmarks only: every data-plane frame this process sends arrives this many ms later, as over a "
                    "WAN link (a one-way delay per link; set it on the Oracle and every Scout)")
    add_option(p, "--simulate-link-jitter-ms", default=0.0, type=float, help="benchmarks only: up to this much more, at random")
    add_option(p, "--simulate-link-mbps", default=0.0, type=float, help="benchmarks only: the link's bandwidth (0: unlimited)")


def configure_from(args: argparse.Namespace) -> None:
    LINK.configure(args.simulate_link_ms, args.simulate_link_jitter_ms, args.simulate_link_mbps)
