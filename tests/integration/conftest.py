"""A real ``shard-oracle serve`` process, started once for all API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError("server did not become ready")


@pytest.fixture(scope="session")
def server():
    port = free_port()
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"shard-oracle-{port}.log"), "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "oracle.cli", "serve", "--port", str(port), "--model-aliases", "smollm2",
         "--max-body-mb", "1", "--max-queued", "64", "--log-level", "info"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def model_id(server):
    return requests.get(server + "/v1/models", timeout=5).json()["data"][0]["id"]
