"""A real ``shard-oracle serve`` process, started once for all API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import openai
import pytest
import requests

from oracle.swarm.local_scouts import LocalScout
from shard_common.processes import stop_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0, ready: bool = True) -> None:
    """Until /health says ready (200), or with ``ready=False`` until the server answers at all."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            status = requests.get(url + "/health", timeout=2).status_code
            if status == 200 or (not ready and status == 503):
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise TimeoutError("server did not become ready")


ADMIN_KEY = "sk-oracle-test-admin-" + "x" * 32


def cli(*args: str, data_dir=None, redis_url=None) -> subprocess.CompletedProcess:
    """``shard-oracle keys ...`` against an Oracle's data dir (its embedded Redis) or a Redis URL."""
    where = ["--redis-url", redis_url] if redis_url else ["--data-dir", str(data_dir)]
    return subprocess.run([sys.executable, "-m", "oracle.cli", "keys", *args, *where], capture_output=True, text=True, timeout=60)


def create_key(name: str, *flags: str, **where) -> str:
    out = cli("create", "--name", name, *flags, **where)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def same_or_tied_tokens(a: list, b: list) -> bool:
    """Two greedy answers' token logprobs (``logprobs.content``): True when the tokens are
    identical; else the first difference must sit on a near-tie in both. One row of a batch and
    the same row alone (or in a verification pass) differ in the last bits, which can flip a
    near-tied token: exact-identity claims hold only up to that."""
    from ..model.test_speculative_engine import TIE_EPSILON

    for x, y in zip(a, b):
        if x.token != y.token:
            for t in (x, y):
                assert t.top_logprobs[0].logprob - t.top_logprobs[1].logprob <= TIE_EPSILON, (x, y)
            return False
    assert [t.token for t in a] == [t.token for t in b]
    return True


def client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def stream_logprobs(url: str, model_id: str, prompt: str, max_tokens: int, on_token=None) -> list:
    """A greedy stream's token logprobs (for ``same_or_tied_tokens``), exactly ``max_tokens``
    long; ``on_token(n)`` after each of them (a fault to inject mid-stream)."""
    stream = client(url, ADMIN_KEY).chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens, stream=True,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    tokens = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            tokens += chunk.choices[0].logprobs.content
            if on_token is not None:
                on_token(len(tokens))
    return tokens


def greedy_answers(url: str, model_id: str, prompts: list[str], max_tokens: int) -> list[str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    return [c.chat.completions.create(model=model_id, messages=[{"role": "user", "content": p}], temperature=0,
                                      max_tokens=max_tokens).choices[0].message.content for p in prompts]


def stream_killing_the_carrier(swarm, scouts, span: tuple[int, int], server: str, model_id: str,
                               max_tokens: int) -> tuple[str, str, str]:
    """Stream a greedy answer from ``swarm`` and, a few chunks in, SIGKILL whichever of ``scouts``
    serving ``span`` carries the session: (the streamed text, the single process's answer, the
    killed Scout's peer id)."""
    kw = dict(model=model_id, messages=[{"role": "user", "content": "Write a short poem about the sea."}],
              temperature=0, max_tokens=max_tokens)
    expected = openai.OpenAI(base_url=server + "/v1", api_key=ADMIN_KEY).chat.completions.create(**kw).choices[0].message.content
    c = openai.OpenAI(base_url=swarm.url + "/v1", api_key=ADMIN_KEY, max_retries=0)
    pieces, killed = [], None
    for i, chunk in enumerate(c.chat.completions.create(**kw, stream=True)):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if i == 5:
            killed = next(s["peer_id"] for s in swarm.status()["scouts"] if s["span"] == list(span) and s["sessions"])
            next(s for s in scouts if s.address.peer_id == killed).proc.kill()
    return "".join(pieces), expected, killed


def static_scouts(tmp_path_factory, spans, name: str = "scout"):
    """One ``shard-scout --span`` process per span, stopped at the end (a generator for fixtures)."""
    made = []
    try:
        for span in spans:
            made.append(LocalScout(span, tmp_path_factory.mktemp(name)))
        yield made
    finally:
        for s in made:
            s.stop()


class OracleProcess:
    """A real ``shard-oracle serve`` in its own data directory, stopped with SIGTERM."""

    def __init__(self, data_dir, *extra: str, env: dict | None = None, ready: bool = True, p2p_port: int | None = None):
        self.port = free_port()
        self.p2p_port = p2p_port or free_port()  # libp2p, used with --swarm / --local-scouts
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(str(data_dir), f"oracle-{self.port}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oracle.cli", "serve", "--port", str(self.port), "--data-dir", str(data_dir),
             "--log-level", "info", "--p2p-port", str(self.p2p_port), "--data-port", "0", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "SHARD_ADMIN_KEY": ADMIN_KEY, **(env or {})},
        )
        try:
            wait_ready(self.url, self.proc, ready=ready)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.proc, timeout=30)
        self.log.close()

    def status(self) -> dict:
        return requests.get(self.url + "/v1/cluster/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10).json()

    def wait_for(self, what: str, check, timeout: float = 60.0):
        """Poll the cluster status until ``check(status)`` is truthy; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            value = check(status)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last status: {status}")
            time.sleep(0.3)


class ScoutSwarm:
    """An Oracle running the libp2p swarm (``--swarm`` plus ``oracle_args``) and Scouts started by
    hand that join it, by name. Restart the Oracle with ``restart_oracle`` (same data, same port)."""

    def __init__(self, root, *oracle_args: str):
        self.root = root
        (root / "oracle").mkdir()
        self.p2p_port = free_port()
        self.oracle_args = oracle_args
        self.scouts: dict[str, LocalScout] = {}
        self.oracle = self._start_oracle()

    def _start_oracle(self) -> OracleProcess:
        return OracleProcess(self.root / "oracle", "--swarm", *self.oracle_args, p2p_port=self.p2p_port, ready=False)

    def restart_oracle(self) -> None:
        self.oracle.stop()
        self.oracle = self._start_oracle()

    @property
    def bootstrap(self) -> str:
        return self.oracle.status()["oracle_multiaddrs"][0]

    def add(self, name: str, *extra: str, bootstrap: str | None = "oracle") -> LocalScout:
        """A Scout joining through ``bootstrap`` (a multiaddr; "oracle": the Oracle's; None: it
        asks the Oracle's /swarm through --oracle-url)."""
        if bootstrap is None:
            join = ["--oracle-url", self.oracle.url]
        else:
            join = ["--bootstrap", self.bootstrap if bootstrap == "oracle" else bootstrap]
        self.scouts[name] = LocalScout(None, self.root / name, [*join, "--threads", "1", "--heartbeat", "0.5", *extra])
        return self.scouts[name]

    def scout(self, name: str, status: dict | None = None) -> dict | None:
        peer = self.scouts[name].address.peer_id
        return next((s for s in (status or self.oracle.status())["scouts"] if s["peer_id"] == peer), None)

    def stop(self) -> None:
        self.oracle.stop()
        for s in self.scouts.values():
            s.stop()


@pytest.fixture(scope="session")
def oracle(tmp_path_factory):
    """The shared Oracle: embedded Redis (the default), auth on."""
    o = OracleProcess(tmp_path_factory.mktemp("oracle"), "--model-aliases", "smollm2", "--max-body-mb", "1",
                      "--max-queued", "64", "--auth-cache-seconds", "1")
    yield o
    o.stop()


@pytest.fixture(scope="session")
def server(oracle):
    return oracle.url


@pytest.fixture(scope="session")
def admin_headers():
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="session")
def model_id(server, admin_headers):
    return requests.get(server + "/v1/models", headers=admin_headers, timeout=5).json()["data"][0]["id"]
