"""What a lying Scout can deliver to clients before it is caught, what honest Scouts suffer, and
what auditing costs — with real processes: an Oracle over libp2p (``--fallback-local``), an honest
Scout on blocks 0-15, and a Scout started with ``--inject-faults corrupt=P`` that joins and becomes
the only Scout of blocks 15-30.

Phases (each on fresh Oracles, so reputations start clean):
- ``sole``: for each P, ``--requests`` greedy chat requests one after another (P=0 first: the
  honest answers every later answer is compared with): wrong answers delivered, the liar's
  forwards until quarantine, the Oracle's checks.
- ``honest``: honest Scouts of every backend here (quant and dense, 1 and 2 threads) with every
  session followed, under concurrent load until ``--honest-checks`` forwards were checked: false
  failures (must be 0), plausibility flags, the relative errors honest Scouts show.
- ``cost``: aggregate tokens/s and the Oracle's CPU seconds per token with an honest Scout in the
  liar's place: auditing off (``--no-audits``), on probation (every session followed), and
  trusted (after probation: the sampled steady state).
Prints tables, writes bench/results/trust.json.

    python bench/trust.py [--corruption 0.01 0.05 0.2 1] [--requests 80] [--phases sole honest cost]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.api import run_level, wait_ready  # noqa: E402
from bench.common import print_table, write_json  # noqa: E402
from oracle.swarm.local_scouts import LocalScout  # noqa: E402

KEY = "sk-oracle-bench-" + "t" * 32
HEADERS = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Describe the water cycle.", "What is two plus two?",
             "Write a haiku about rain.", "Who wrote Hamlet?", "Give me a tip for sleeping well.", "What is a prime number?"]


class Oracle:
    def __init__(self, root: Path, port: int, *extra: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / f"oracle-{port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oracle.cli", "serve", "--port", str(port), "--data-dir", str(root / f"oracle-{port}"),
             "--swarm", "--blocks-per-scout", "15", "--dead-after", "2", "--fallback-local", "--p2p-port", str(port + 100),
             "--data-port", "0", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "SHARD_ADMIN_KEY": KEY})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                self.bootstrap = self.status()["oracle_multiaddrs"][0]
                self.model = requests.get(self.url + "/v1/models", headers=HEADERS, timeout=5).json()["data"][0]["id"]
                return
            except (requests.RequestException, KeyError, IndexError):
                time.sleep(0.5)
        raise TimeoutError("oracle did not start")

    def status(self) -> dict:
        return requests.get(self.url + "/v1/cluster/status", headers=HEADERS, timeout=10).json()

    def scout(self, peer: str) -> dict | None:
        return next((s for s in self.status()["scouts"] if s["peer_id"] == peer and s["state"] != "dead"), None)

    def ask(self, question: str) -> str | None:
        r = requests.post(self.url + "/v1/chat/completions", headers=HEADERS, timeout=300, json={
            "model": self.model, "messages": [{"role": "user", "content": question}], "max_tokens": 16, "temperature": 0,
            "speculative": "off"})
        return r.json()["choices"][0]["message"]["content"] if r.ok else None

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def scout(root: Path, name: str, oracle: Oracle, *extra: str) -> LocalScout:
    return LocalScout(None, root / name, ["--bootstrap", oracle.bootstrap, "--threads", "1", "--heartbeat", "0.5", *extra])


def wait(check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.3)
    raise TimeoutError("condition not reached")


def serving(oracle: Oracle, s: LocalScout) -> dict:
    return wait(lambda: (info := oracle.scout(s.address.peer_id)) and info["state"] in ("active", "spare", "quarantined") and info)


def sole_liar(root: Path, corruption: float, n_requests: int, expected: dict | None, port: int) -> tuple[dict, dict]:
    """The issue's scenario; returns (the row, the answers given)."""
    oracle = Oracle(root, port)
    first = scout(root, f"first-{port}", oracle)
    liar = None
    try:
        wait(lambda: (info := oracle.scout(first.address.peer_id)) and info["span"] == [0, 15])
        extra = ["--inject-faults", f"corrupt={corruption}"] if corruption else []
        liar = scout(root, f"liar-{port}", oracle, *extra)
        serving(oracle, liar)
        answers, wrong, caught_at, requests_at = {}, 0, None, None
        t0 = time.monotonic()
        for i in range(n_requests):
            q = QUESTIONS[i % len(QUESTIONS)]
            answer = oracle.ask(q)
            answers.setdefault(q, answer)
            wrong += expected is not None and answer != expected[q]
            if caught_at is None:
                info = oracle.scout(liar.address.peer_id) or {}
                if info.get("reputation") in ("quarantined", "banned"):
                    caught_at, requests_at = info.get("forwards"), i + 1
        elapsed = time.monotonic() - t0
        status = oracle.status()
        info = next((s for s in status["scouts"] if s["peer_id"] == liar.address.peer_id), {})
        audits = status.get("audits") or {}
        row = {"corruption": corruption, "requests": n_requests, "wrong_answers": wrong,
               "wrong_per_100": round(100 * wrong / n_requests, 2), "liar_forwards": info.get("forwards"),
               "forwards_to_quarantine": caught_at, "requests_to_quarantine": requests_at,
               "checks_passed": status["tickets"]["passed"], "checks_failed": status["tickets"]["failed"],
               "sessions_followed": audits.get("sessions_followed"), "sessions_started": audits.get("sessions_started"),
               "recomputed": audits.get("recomputed"), "tainted_sessions": info.get("tainted_sessions"),
               "requests_per_s": round(n_requests / elapsed, 2)}
        return row, answers
    finally:
        oracle.stop()
        first.stop()
        if liar is not None:
            liar.stop()


def honest(root: Path, checks: int, port: int) -> dict:
    """Every session followed (probation never ends) on honest Scouts of every backend here."""
    oracle = Oracle(root, port, "--audit-probation", "1000000000", "--blocks-per-scout", "15")
    flavours = [[], ["--backend", "dense"], ["--threads", "2"], ["--backend", "dense", "--threads", "2"]]
    scouts = [scout(root, f"h{i}-{port}", oracle, *extra) for i, extra in enumerate(flavours)]
    try:
        wait(lambda: len([s for s in oracle.status()["scouts"] if s["state"] in ("active", "spare")]) == len(flavours))
        wait_ready(oracle.url)
        started = time.monotonic()
        while True:
            status = oracle.status()
            t = status["tickets"]
            if t["passed"] + t["failed"] >= checks:
                break
            asyncio.run(run_level(oracle.url, oracle.model, 8, 64, KEY))
        quarantined = [s["peer_id"] for s in status["scouts"] if s.get("reputation") not in (None, "active")]
        per_scout = {s["peer_id"][-6:]: s.get("clean_checks") for s in status["scouts"]}
        return {"checks": t["passed"] + t["failed"], "failed": t["failed"], "quarantined_scouts": len(quarantined),
                "plausibility_flags": status["audits"]["plausibility"]["flagged"], "recomputed": status["audits"]["recomputed"],
                "honest_error_p50": t["honest_error_p50"], "honest_error_max": t["honest_error_max"],
                "checks_per_s": round((t["passed"] + t["failed"]) / (time.monotonic() - started), 1), "per_scout": per_scout}
    finally:
        oracle.stop()
        for s in scouts:
            s.stop()


def cost(root: Path, port: int, rounds: int) -> list[dict]:
    rows = []
    for name, extra in (("off", ["--no-audits"]), ("probation", ["--audit-probation", "1000000000"]), ("trusted", [])):
        oracle = Oracle(root, port, *extra)
        scouts = [scout(root, f"c{i}-{port}", oracle) for i in range(2)]
        try:
            wait(lambda: oracle.status()["coverage"] == [1] * 30)
            wait_ready(oracle.url)
            if name == "trusted":  # past probation and its halving: the sampled steady state
                wait(lambda: (asyncio.run(run_level(oracle.url, oracle.model, 4, 48, KEY)) and
                              all((s.get("clean_checks") or 0) >= 2000 for s in oracle.status()["scouts"])), timeout=1800)
            asyncio.run(run_level(oracle.url, oracle.model, 2, 8, KEY))
            cpu0, results = oracle.cpu_seconds(), []
            for _ in range(rounds):
                results.append(asyncio.run(run_level(oracle.url, oracle.model, 4, 48, KEY)))
            cpu = oracle.cpu_seconds() - cpu0
            tokens = sum(r["tokens"] for r in results)
            audits = oracle.status().get("audits") or {}
            rows.append({"audits": name, "aggregate_tok_s": round(sum(r["aggregate_tok_s"] for r in results) / rounds, 2),
                         "itl_p50_ms": round(sorted(r["itl_p50_ms"] for r in results)[rounds // 2], 1),
                         "oracle_cpu_ms_per_token": round(1000 * cpu / tokens, 2),
                         "followed_share": round(audits["sessions_followed"] / max(1, audits["sessions_started"]), 3) if audits else 0.0,
                         "audit_share": audits.get("audit_share", 0.0)})
        finally:
            oracle.stop()
            for s in scouts:
                s.stop()
        port += 2
    off = rows[0]["aggregate_tok_s"]
    for r in rows:
        r["vs_off"] = round(r["aggregate_tok_s"] / off, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corruption", type=float, nargs="+", default=[0.01, 0.05, 0.2, 1.0])
    parser.add_argument("--requests", type=int, default=80, help="greedy chat requests per liar")
    parser.add_argument("--honest-checks", type=int, default=10000)
    parser.add_argument("--cost-rounds", type=int, default=5)
    parser.add_argument("--phases", nargs="+", default=["sole", "honest", "cost"], choices=["sole", "honest", "cost"])
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "sole" in args.phases:
            baseline, expected = sole_liar(root, 0.0, len(QUESTIONS), None, 8960)
            rows = [baseline]
            for i, p in enumerate(args.corruption):
                rows.append(sole_liar(root, p, args.requests, expected, 8962 + 2 * i)[0])
            print_table(rows, ["corruption", "requests", "wrong_answers", "wrong_per_100", "forwards_to_quarantine",
                               "requests_to_quarantine", "liar_forwards", "checks_failed", "recomputed", "tainted_sessions"])
            results["sole"] = rows
        if "honest" in args.phases:
            results["honest"] = honest(root, args.honest_checks, 9100)
            print_table([results["honest"]], [k for k in results["honest"] if k != "per_scout"])
        if "cost" in args.phases:
            results["cost"] = cost(root, 9110, args.cost_rounds)
            print_table(results["cost"], list(results["cost"][0]))
    name = "trust" if len(args.phases) == 3 else "trust-" + "-".join(args.phases)
    print("wrote", write_json(name, results))


if __name__ == "__main__":
    main()
