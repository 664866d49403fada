"""Scouts behind NAT, with real processes: one in a network namespace the test creates (a veth
pair; the Scout's data plane listens only on the namespace's own loopback, so nothing outside can
reach it, and it announces that loopback address) joins, gets a span, dials the Oracle's data
plane itself and serves requests; the Oracle never dials the address it claimed; killing it
mid-stream fails over like any death. And ``--no-listen`` on plain loopback."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from oracle.swarm.local_scouts import LocalScout
from shard_common.processes import stop_process

from .conftest import ADMIN_KEY, OracleProcess, client, free_port, same_or_tied_tokens, stream_logprobs

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ask(url: str, model_id: str) -> str:
    return client(url, ADMIN_KEY).chat.completions.create(model=model_id, messages=QUESTION, temperature=0,
                                                          max_tokens=16).choices[0].message.content


def manifest_of(oracle_dir: Path) -> str:
    return str(next((oracle_dir / "shards").glob("*/manifest.json")))


def scout_info(status: dict, peer: str) -> dict | None:
    return next((s for s in status["scouts"] if s["peer_id"] == peer), None)


def test_a_scout_that_does_not_listen_dials_in_and_serves(tmp_path_factory, tmp_path, server, model_id):
    oracle = OracleProcess(tmp_path, "--swarm", ready=False)
    scout = None
    try:
        bootstrap = oracle.status()["oracle_multiaddrs"][0]
        scout = LocalScout(None, tmp_path_factory.mktemp("nolisten"), ["--bootstrap", bootstrap, "--no-listen",
                                                                      "--shards", manifest_of(tmp_path), "--threads", "1"])
        assert scout.address.port == 0  # nothing to dial
        info = oracle.wait_for("the Scout connected", lambda st: (s := scout_info(st, scout.address.peer_id))
                               and s["state"] in ("active", "spare") and s, timeout=90)
        assert info["reached"] == "scout-dialed"
        assert ask(oracle.url, model_id) == ask(server, model_id)
    finally:
        oracle.stop()
        if scout is not None:
            scout.stop()


# ---- a network namespace ------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture()
def namespace():
    """A network namespace joined to this one by a veth pair: (name, host side IP, namespace IP)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's ip")
    n = os.getpid() % 200 + 20
    name, outside, inside = f"shard-nat-{os.getpid()}", f"shv{os.getpid() % 100000}a", f"shv{os.getpid() % 100000}b"
    host_ip, ns_ip = f"10.231.{n}.1", f"10.231.{n}.2"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/30", "dev", inside)
        _ip("netns", "exec", name, "ip", "link", "set", inside, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, host_ip, ns_ip
    finally:
        _ip("link", "del", outside, check=False)
        _ip("netns", "del", name, check=False)


class NamespacedScout:
    """``shard-scout`` inside a network namespace."""

    def __init__(self, namespace: str, data_dir: Path, args: list[str]):
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "scout.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", namespace, sys.executable, "-m", "scout.cli", "--data-dir",
                                      str(data_dir), *args], stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()
        m = re.match(r"scout (\S+)@", line)
        if not m:
            self.stop()
            raise RuntimeError(f"the namespaced Scout did not start: {line!r}; see {self.log_path}")
        self.peer_id = m.group(1)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


class Canary:
    """A TCP listener counting connections: where the Oracle must never connect."""

    def __init__(self, host: str, port: int):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._count, daemon=True).start()

    def _count(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


STORY = "Write a long story about a ship in a storm."


def test_a_scout_behind_nat_joins_serves_and_fails_over(namespace, tmp_path_factory, tmp_path, server, model_id):
    ns, host_ip, ns_ip = namespace
    p2p_port = free_port()
    oracle = OracleProcess(tmp_path, "--swarm", "--p2p-host", "0.0.0.0", "--dead-after", "2", "--hop-timeout", "5",
                           p2p_port=p2p_port, ready=False)
    # The Scout claims 127.0.0.1:<port> for its data plane; on the Oracle's machine that port is this
    # canary. An Oracle that believed the claim would connect to it.
    claimed_port = free_port()
    canary = Canary("127.0.0.1", claimed_port)
    nat = replica = None
    try:
        oracle_id = oracle.status()["oracle_peer_id"]
        bootstrap = f"/ip4/{host_ip}/tcp/{p2p_port}/p2p/{oracle_id}"
        nat = NamespacedScout(ns, tmp_path_factory.mktemp("behind-nat"), [
            "--bootstrap", bootstrap, "--host", "127.0.0.1", "--data-port", str(claimed_port), "--threads", "1",
            "--heartbeat", "0.5", "--shards", manifest_of(tmp_path)])
        info = oracle.wait_for("the Scout behind NAT serving", lambda st: (s := scout_info(st, nat.peer_id))
                               and s["state"] in ("active", "spare") and s, timeout=120)
        assert info["reached"] == "scout-dialed" and info["address"] == ns_ip  # where it really is
        assert ask(oracle.url, model_id) == ask(server, model_id)
        log = open(oracle.log_path).read()
        assert f"cannot be reached at {ns_ip}:{claimed_port}" in log  # the dial-back went to the observed address...
        assert canary.connections == 0  # ...never to the claimed one
        undisturbed = stream_logprobs(oracle.url, model_id, STORY, 400)

        # A replica joins on this side; then the Scout behind NAT dies mid-stream.
        killed = []

        def kill_once_the_replica_serves(n: int) -> None:
            nonlocal replica
            if n == 3 and replica is None:
                replica = LocalScout(None, tmp_path_factory.mktemp("replica"), [
                    "--bootstrap", f"/ip4/127.0.0.1/tcp/{p2p_port}/p2p/{oracle_id}", "--threads", "1",
                    "--shards", manifest_of(tmp_path)], wait=False)
            if replica is not None and not killed and n >= 20 and min(oracle.status()["coverage"]) >= 2:
                nat.proc.kill()
                killed.append(n)

        disturbed = stream_logprobs(oracle.url, model_id, STORY, 400, kill_once_the_replica_serves)
        assert killed, "the replica did not join before the stream ended"
        assert len(disturbed) == len(undisturbed)
        same_or_tied_tokens(undisturbed, disturbed)
        assert oracle.status()["failovers"] >= 1
    finally:
        canary.close()
        oracle.stop()
        for s in (nat, replica):
            if s is not None:
                s.stop()
