"""Scout processes started by the Oracle on this machine (``serve --local-scouts N``)."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

from shard_common.processes import stop_process

from .remote import ScoutAddress

log = logging.getLogger(__name__)


def even_spans(n_layers: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous spans covering [0, n_layers), sizes differing by at most one block."""
    bounds = [round(i * n_layers / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


def place(n_layers: int, scouts: int, replicas: int = 1) -> list[tuple[int, int]]:
    """The span each of ``scouts`` local Scouts serves: ``scouts // replicas`` distinct spans,
    each served ``replicas`` times (so any one Scout can die without losing a span)."""
    if scouts < 1 or replicas < 1 or scouts < replicas:
        raise ValueError("need at least as many Scouts as replicas, and at least one of each")
    spans = even_spans(n_layers, scouts // replicas)
    return [spans[i % len(spans)] for i in range(scouts)]


class LocalScout:
    """One ``shard-scout`` process; ``address`` is read from the line it prints when listening."""

    def __init__(self, span: tuple[int, int], data_dir: Path, extra: list[str] | None = None, timeout: float = 180.0):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.span = span
        self.log_path = data_dir / "scout.log"
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scout.cli", "--span", f"{span[0]}:{span[1]}", "--data-dir", str(data_dir), *(extra or [])],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.address = self._read_address(timeout)

    def _read_address(self, timeout: float) -> ScoutAddress:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"scout exited with {self.proc.returncode}; see {self.log_path}")
            m = re.match(r"scout (\S+) span", line)
            if m:
                return ScoutAddress.parse(m.group(1))
        self.stop()
        raise TimeoutError(f"scout did not start within {timeout}s; see {self.log_path}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def start_local_scouts(n_layers: int, count: int, replicas: int, data_dir: Path, extra: list[str] | None = None) -> list[LocalScout]:
    started: list[LocalScout] = []
    try:
        for i, span in enumerate(place(n_layers, count, replicas)):
            started.append(LocalScout(span, data_dir / f"scout-{i}", extra))
            log.warning("local Scout %d serves blocks [%d, %d) at %s", i, span[0], span[1], started[-1].address.port)
    except BaseException:
        for s in started:
            s.stop()
        raise
    return started
