"""Scout processes started by the Oracle on this machine (``serve --local-scouts N``): they join
over libp2p like remote Scouts, and the Oracle assigns their spans. One that dies is started again
(in its own data dir, so it comes back with the same identity)."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

from shard_common.identity import Identity
from shard_common.processes import stop_process

from .connection import ScoutAddress

log = logging.getLogger(__name__)


class LocalScout:
    """One ``shard-scout`` process; ``address`` is read from the line it prints when listening.
    ``span`` fixes its span (``--span``); without it, pass ``--bootstrap`` in ``extra``."""

    def __init__(self, span: tuple[int, int] | None, data_dir: Path, extra: list[str] | None = None, timeout: float = 180.0,
                 wait: bool = True):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.span = span
        self.timeout = timeout
        self.log_path = data_dir / "scout.log"
        self._log = open(self.log_path, "a")
        args = ["--span", f"{span[0]}:{span[1]}"] if span else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scout.cli", *args, "--data-dir", str(data_dir), *(extra or [])],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self.address: ScoutAddress | None = None
        if wait:
            self.wait()

    def wait(self) -> ScoutAddress:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"scout exited with {self.proc.returncode}; see {self.log_path}")
            m = re.match(r"scout (\S+) ", line)
            if m:
                self.address = ScoutAddress.parse(m.group(1))
                return self.address
        self.stop()
        raise TimeoutError(f"scout did not start within {self.timeout}s; see {self.log_path}")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def start_local_scouts(count: int, data_dir: Path, extra: list[str], drafts: int = 0) -> list[LocalScout]:
    """``count`` span Scouts and ``drafts`` draft Scouts started together (they load in parallel),
    each in its own data dir."""
    started: list[LocalScout] = []
    try:
        for i in range(count):
            started.append(LocalScout(None, data_dir / f"scout-{i}", extra, wait=False))
        for i in range(drafts):
            started.append(LocalScout(None, data_dir / f"draft-{i}", [*extra, "--role", "draft"], wait=False))
        for i, s in enumerate(started):
            s.wait()
            log.warning("local Scout %d is %s", i, s.address.peer_id)
    except BaseException:
        for s in started:
            s.stop()
        raise
    return started


class LocalScouts:
    """The local Scouts of one Oracle: started once its control plane listens, watched, restarted."""

    WATCH_SECONDS = 1.0

    def __init__(self, count: int, drafts: int, data_dir: Path, extra: list[str]):
        self.count, self.drafts = count, drafts
        self.data_dir = data_dir
        # Their identities, made now so the Oracle knows its own Scouts before they connect.
        self.peer_ids = {Identity.load_or_create(data_dir / name / "identity.key").peer_id
                         for name in [*(f"scout-{i}" for i in range(count)), *(f"draft-{i}" for i in range(drafts))]}
        self.extra = extra
        self.scouts: list[LocalScout] = []
        self.restarts = 0
        self._watch: asyncio.Task | None = None

    async def start(self, bootstrap: str) -> None:
        self.extra = [*self.extra, "--bootstrap", bootstrap]
        self.scouts = await asyncio.to_thread(start_local_scouts, self.count, self.data_dir, self.extra, self.drafts)
        self._watch = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(self.WATCH_SECONDS)
            for i, scout in enumerate(self.scouts):
                if scout.proc.poll() is None:
                    continue
                log.warning("local Scout %s exited with %s; starting it again", scout.address.peer_id if scout.address else i,
                            scout.proc.returncode)
                scout.stop()
                data_dir = scout.log_path.parent
                extra = [*self.extra, "--role", "draft"] if i >= self.count else self.extra
                try:
                    self.scouts[i] = await asyncio.to_thread(LocalScout, None, data_dir, extra)
                    self.restarts += 1
                except (RuntimeError, TimeoutError, OSError) as e:
                    log.warning("local Scout %d did not start again: %s", i, e)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await asyncio.to_thread(lambda: [s.stop() for s in self.scouts])
