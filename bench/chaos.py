"""Faults under steady load, against real processes: an Oracle on its own Redis, four Scouts
joined over libp2p (every span served twice), greedy clients comparing every answer with the
answer the same prompt got before any fault.

Phases, each under the same load:
  baseline   no faults: the expected answers and the latency to compare with
  scouts     SIGKILL a random Scout every --kill-every seconds, start it again --down seconds later
  redis      stop Redis for --redis-down seconds, then start it again (append-only file: nothing lost)
  oracle     restart the Oracle (SIGTERM, same data and ports): clients retry until it is back

Per phase: requests, failed requests, answers that differ from the baseline, latency p50/p99,
and for the redis and oracle phases whether every completion stored before and during the fault
can still be retrieved afterwards.

    python bench/chaos.py [--phase-seconds 90] [--kill-every 15] [--clients 3]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.api import pct  # noqa: E402
from bench.common import print_table, write_json  # noqa: E402

KEY = "sk-oracle-bench-" + "c" * 32
PROMPTS = ["What is the capital of France?", "Name three colors.", "Write a short poem about the sea.",
           "Explain how a bicycle works.", "List three fruits."]


class Load:
    """``clients`` threads sending greedy chat requests (every other one streamed) with the official
    client until stopped. Each answer is compared with ``expected[prompt]`` when that is known,
    else it becomes the expected answer. Failed requests are retried by nobody: they count."""

    def __init__(self, url: str, key: str, model: str, clients: int = 3, max_tokens: int = 24,
                 expected: dict[str, str] | None = None, store: bool = False):
        self.url, self.key, self.model, self.clients, self.max_tokens = url, key, model, clients, max_tokens
        self.expected = expected if expected is not None else {}
        self.store = store
        self.records: list[dict] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def ask(self, client, prompt: str, stream: bool) -> tuple[str, str | None]:
        kw = dict(model=self.model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=self.max_tokens)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True) if c.choices), None
        made = client.chat.completions.create(**kw, store=self.store)
        return made.choices[0].message.content, made.id

    def _client(self, index: int) -> None:
        import openai

        client = openai.OpenAI(base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=120)
        i = index
        while not self._stop.is_set():
            prompt, stream = PROMPTS[i % len(PROMPTS)], i % 2 == 1
            i += self.clients
            started = time.monotonic()
            record = {"t": started, "prompt": prompt, "ok": False, "same": None, "error": None, "id": None}
            try:
                text, record["id"] = self.ask(client, prompt, stream)
                record["ok"] = True
                with self._lock:
                    expected = self.expected.setdefault(prompt, text)
                record["same"] = text == expected
            except Exception as e:
                record["error"] = f"{type(e).__name__}: {e}"[:200]
                time.sleep(0.2)  # a refused connection fails fast; don't spin
            record["latency"] = time.monotonic() - started
            with self._lock:
                self.records.append(record)

    def start(self) -> "Load":
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[dict]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        return self.records


def summarize(phase: str, records: list[dict], baseline_p99: float | None = None) -> dict:
    ok = [r for r in records if r["ok"]]
    latency = [r["latency"] for r in ok]
    errors: dict[str, int] = {}
    for r in records:
        if r["error"]:
            kind = r["error"].split(":", 1)[0] + (" (no route)" if "no route" in r["error"] else "")
            errors[kind] = errors.get(kind, 0) + 1
    row = {"phase": phase, "requests": len(records), "failed": len(records) - len(ok),
           "different": sum(1 for r in ok if not r["same"]), "latency_p50_s": pct(latency, 0.5), "latency_p99_s": pct(latency, 0.99),
           "errors": errors}
    if baseline_p99 is not None:
        row["added_p99_s"] = row["latency_p99_s"] - baseline_p99
    return row


class Chaos:
    """Every ``every`` seconds: SIGKILL a random Scout from ``names`` that is up, and start it again
    ``down`` seconds later (in the background, so kills keep their rhythm). A round is skipped
    unless ``ready()``: the promise is no failed request *while a replica exists*, so a kill waits
    until the swarm has re-replicated what the last one took. ``candidates`` narrows the Scouts that
    are up to those a kill may hit (a round with none is skipped too): a test that must see a
    failover kills only Scouts that carry a session at that moment, instead of hoping."""

    def __init__(self, names: list[str], kill: Callable[[str], None], restart: Callable[[str], None], every: float,
                 down: float = 3.0, seed: int = 0, ready: Callable[[], bool] = lambda: True,
                 candidates: Callable[[list[str]], list[str]] = lambda up: up):
        self.names, self.kill, self.restart, self.every, self.down, self.ready = names, kill, restart, every, down, ready
        self.candidates = candidates
        self.random = random.Random(seed)
        self.kills: list[tuple[float, str]] = []
        self.skipped = 0
        self._down: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._restarts: list[threading.Thread] = []

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            up = [n for n in self.names if n not in self._down]
            if not up or not self.ready() or not (targets := self.candidates(up)):
                self.skipped += 1
                continue
            name = self.random.choice(targets)
            self._down.add(name)
            self.kill(name)
            self.kills.append((time.monotonic(), name))
            t = threading.Thread(target=self._bring_back, args=(name,), daemon=True)
            t.start()
            self._restarts.append(t)

    def _bring_back(self, name: str) -> None:
        time.sleep(self.down)
        try:
            self.restart(name)
        finally:
            self._down.discard(name)

    def start(self) -> "Chaos":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for t in self._restarts:
            t.join(timeout=240)


def status(url: str, key: str) -> dict:
    import requests

    return requests.get(url + "/v1/cluster/status", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


def fully_replicated(url: str, key: str, replicas: int) -> bool:
    try:
        return min(status(url, key)["coverage"]) >= replicas
    except Exception:
        return False


def retrievable(url: str, key: str, ids: list[str]) -> int:
    """How many of ``ids`` the Oracle returns (stored completions)."""
    import requests

    headers = {"Authorization": f"Bearer {key}"}
    return sum(requests.get(f"{url}/v1/chat/completions/{i}", headers=headers, timeout=10).status_code == 200 for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-seconds", type=float, default=90.0)
    parser.add_argument("--kill-every", type=float, default=15.0)
    parser.add_argument("--down", type=float, default=3.0, help="seconds a killed Scout stays down")
    parser.add_argument("--redis-down", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--port", type=int, default=8781)
    args = parser.parse_args()

    from oracle.store.redis_server import redis_binary
    from oracle.swarm.local_scouts import LocalScout
    from shard_common.processes import stop_process

    tmp = Path(tempfile.mkdtemp(prefix="shard-chaos-"))
    url, p2p_port, redis_port = f"http://127.0.0.1:{args.port}", args.port + 1, args.port + 2
    redis_url = f"redis://127.0.0.1:{redis_port}/0"

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen([redis_binary(), "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp),
                                 "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        return proc

    def start_oracle() -> subprocess.Popen:
        log = open(tmp / "oracle.log", "a")
        return subprocess.Popen([sys.executable, "-m", "oracle.cli", "serve", "--port", str(args.port), "--data-dir", str(tmp / "oracle"),
                                 "--p2p-port", str(p2p_port), "--swarm", "--blocks-per-scout", "15", "--dead-after", "2",
                                 "--hop-timeout", "5", "--redis-url", redis_url, "--auth-cache-seconds", "2"],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "SHARD_ADMIN_KEY": KEY})

    redis_proc, oracle = start_redis(), start_oracle()
    scouts: dict[str, LocalScout] = {}
    rows: list[dict] = []
    facts: dict = {}
    try:
        wait_until("the Oracle", lambda: _answers(url), 300)
        bootstrap = status(url, KEY)["oracle_multiaddrs"][0]
        extra = ["--bootstrap", bootstrap, "--threads", "1", "--heartbeat", "0.5"]

        def restart(name: str) -> None:
            scouts[name] = LocalScout(None, tmp / name, extra)

        for name in ("a", "b", "c", "d"):
            scouts[name] = LocalScout(None, tmp / name, extra, wait=False)
        for s in scouts.values():
            s.wait()
        wait_until("every span served twice", lambda: fully_replicated(url, KEY, 2), 300)
        import requests

        model = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()["data"][0]["id"]

        def phase(name: str, during: Callable[[], dict | None], load: Load) -> list[dict]:
            load.start()
            extra_facts = during() or {}
            records = load.stop()
            rows.append({**summarize(name, records, rows[0]["latency_p99_s"] if rows else None), **extra_facts})
            print(f"{name}: {rows[-1]}", flush=True)
            return records

        # The expected answers: each prompt alone, before any load or fault (also warms every Scout up).
        probe = Load(url, KEY, model, 1, args.max_tokens)
        import openai

        warm = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        expected = {p: probe.ask(warm, p, stream=False)[0] for p in PROMPTS}
        phase("baseline", lambda: time.sleep(args.phase_seconds), Load(url, KEY, model, args.clients, args.max_tokens, expected))

        def scout_chaos() -> dict:
            chaos = Chaos(list(scouts), lambda n: scouts[n].proc.kill(), restart, args.kill_every, args.down,
                          ready=lambda: fully_replicated(url, KEY, 2)).start()
            time.sleep(args.phase_seconds)
            chaos.stop()
            back = wait_until("full replication after the kills", lambda: fully_replicated(url, KEY, 2), 300)
            return {"kills": len(chaos.kills), "skipped_rounds": chaos.skipped, "failovers": status(url, KEY)["failovers"],
                    "replicated_again_after_s": back}

        phase("scouts", scout_chaos, Load(url, KEY, model, args.clients, args.max_tokens, expected))

        def redis_outage() -> dict:
            nonlocal redis_proc
            time.sleep(args.phase_seconds / 3)
            stop_process(redis_proc)
            stopped = time.monotonic()
            time.sleep(args.redis_down)
            redis_proc = start_redis()
            facts["redis_stopped_at"] = stopped
            time.sleep(args.phase_seconds / 3)
            return {}

        redis_load = Load(url, KEY, model, args.clients, args.max_tokens, expected, store=True)
        records = phase("redis", redis_outage, redis_load)
        ids = [r["id"] for r in records if r["id"]]
        during = [r for r in records if facts["redis_stopped_at"] <= r["t"] <= facts["redis_stopped_at"] + args.redis_down]
        time.sleep(3)  # the Oracle's write-behind buffer flushes once Redis is back
        rows[-1].update({"stored": len(ids), "retrievable_after": retrievable(url, KEY, ids),
                         "requests_during_outage": len(during), "failed_during_outage": sum(1 for r in during if not r["ok"])})

        def oracle_restart() -> dict:
            nonlocal oracle
            time.sleep(args.phase_seconds / 3)
            stop_process(oracle, timeout=30)
            oracle = start_oracle()
            back = wait_until("the Scouts to come back", lambda: fully_replicated(url, KEY, 2), 300)
            time.sleep(args.phase_seconds / 3)
            return {"scouts_back_after_s": round(back, 1)}

        restart_load = Load(url, KEY, model, args.clients, args.max_tokens, expected, store=True)
        records = phase("oracle", oracle_restart, restart_load)
        ids += [r["id"] for r in records if r["id"]]
        rows[-1].update({"stored": len(ids), "retrievable_after": retrievable(url, KEY, ids)})
    finally:
        for s in scouts.values():
            s.stop()
        stop_process(oracle, timeout=30)
        stop_process(redis_proc)
    print_table(rows, ["phase", "requests", "failed", "different", "latency_p50_s", "latency_p99_s", "added_p99_s", "kills",
                       "failovers", "stored", "retrievable_after"])
    print("wrote", write_json("chaos", {"args": vars(args), "results": rows}))


def _answers(url: str) -> bool:
    """The Oracle answers HTTP (it is not ready before Scouts join)."""
    import requests

    try:
        requests.get(url + "/health", timeout=2)
        return True
    except requests.RequestException:
        return False


if __name__ == "__main__":
    main()
