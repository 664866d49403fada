"""How fast golden tickets catch lying Scouts, what reaches clients meanwhile, and what auditing
costs — with real processes: an Oracle over libp2p, honest Scouts, and one Scout started with
``--inject-faults corrupt=C`` as the only server of half of the blocks.

For every ticket rate R and corruption rate C, ``--trials`` times: greedy requests (8 tokens) one
after another until the liar is quarantined (or ``--budget`` requests): the liar's forwards until
quarantine, and the answers that differed from an honest swarm's (corrupted answers served).
Then honest Scouts alone under a high ticket rate until ``--honest-tickets`` tickets: false
positives and the relative errors honest Scouts show. Then throughput with auditing off vs on.
Prints tables, writes bench/results/trust.json and trust.png.

    python bench/trust.py [--ticket-rates 0.02 0.05 0.1] [--corruption 1 0.2 0.05 0.01] [--trials 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.api import run_level, wait_ready  # noqa: E402
from bench.common import print_table, save_plot, write_json  # noqa: E402
from oracle.swarm.local_scouts import LocalScout  # noqa: E402

KEY = "sk-oracle-bench-" + "t" * 32
HEADERS = {"Authorization": f"Bearer {KEY}"}
QUESTIONS = ["What is the capital of France?", "Name three colors.", "Describe the water cycle.", "What is two plus two?"]


class Oracle:
    def __init__(self, root: Path, port: int, *extra: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(root / f"oracle-{port}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oracle.cli", "serve", "--port", str(port), "--data-dir", str(root / f"oracle-{port}"),
             "--no-store", "--swarm", "--blocks-per-scout", "15", "--dead-after", "2", "--p2p-port", str(port + 100), *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "SHARD_ADMIN_KEY": KEY})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                self.bootstrap = self.status()["oracle_multiaddrs"][0]
                self.model = requests.get(self.url + "/v1/models", headers=HEADERS, timeout=5).json()["data"][0]["id"]
                return
            except (requests.RequestException, KeyError):
                time.sleep(0.5)
        raise TimeoutError("oracle did not start")

    def status(self) -> dict:
        return requests.get(self.url + "/v1/cluster/status", headers=HEADERS, timeout=10).json()

    def scout(self, peer: str) -> dict | None:
        return next((s for s in self.status()["scouts"] if s["peer_id"] == peer and s["state"] != "dead"), None)

    def ask(self, question: str) -> str | None:
        r = requests.post(self.url + "/v1/chat/completions", headers=HEADERS, timeout=120, json={
            "model": self.model, "messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0,
            "speculative": "off"})
        return r.json()["choices"][0]["message"]["content"] if r.ok else None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def scout(root: Path, name: str, oracle: Oracle, *extra: str) -> LocalScout:
    return LocalScout(None, root / name, ["--bootstrap", oracle.bootstrap, "--threads", "1", "--heartbeat", "0.5", *extra])


def wait(check, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.3)
    raise TimeoutError("condition not reached")


def detection(root: Path, rate: float, corruption: float, trials: int, budget: int, expected: dict, port: int) -> dict:
    oracle = Oracle(root, port, "--ticket-rate", str(rate))
    honest_b = scout(root, f"b-{port}", oracle)
    results = []
    try:
        for trial in range(trials):
            # The liar joins into the hole a stopped honest Scout left: it alone serves those blocks.
            honest_a = scout(root, f"a-{port}-{trial}", oracle)
            wait(lambda: oracle.status()["coverage"] == [1] * 30)
            honest_a.stop()
            wait(lambda: 0 in oracle.status()["coverage"])
            liar = scout(root, f"liar-{port}-{trial}", oracle, "--inject-faults", f"corrupt={corruption}")
            # Serving, or already caught by the ticket every newcomer gets at once.
            wait(lambda: (s := oracle.scout(liar.address.peer_id)) and s["state"] in ("active", "spare", "quarantined", "refused"))
            wrong, sent, forwards, caught = 0, 0, 0, False
            while sent < budget:
                q = QUESTIONS[sent % len(QUESTIONS)]
                answer = oracle.ask(q)
                sent += 1
                wrong += answer is not None and answer != expected[q]
                info = oracle.scout(liar.address.peer_id) or {}
                forwards = max(forwards, info.get("forwards") or 0)
                if info.get("reputation") in ("quarantined", "banned"):
                    caught = True
                    break
            results.append({"caught": caught, "liar_forwards": forwards, "requests": sent, "wrong_answers": wrong})
            liar.stop()
    finally:
        oracle.stop()
        honest_b.stop()
    caught = [r["liar_forwards"] for r in results if r["caught"]]
    return {"ticket_rate": rate, "corruption": corruption, "trials": trials, "caught": len(caught),
            "median_forwards_to_quarantine": statistics.median(caught) if caught else None,
            "worst_forwards_to_quarantine": max(caught) if caught else None,
            "wrong_answers_served": sum(r["wrong_answers"] for r in results), "runs": results}


def honest(root: Path, tickets: int, port: int) -> dict:
    oracle = Oracle(root, port, "--ticket-rate", "1", "--ticket-idle-seconds", "0.01")
    scouts = [scout(root, f"h{i}-{port}", oracle, *extra) for i, extra in enumerate([[], [], ["--backend", "dense"]])]
    try:
        wait(lambda: len([s for s in oracle.status()["scouts"] if s["state"] in ("active", "spare")]) == 3)
        oracle.ask(QUESTIONS[0])  # real prompts become ticket material
        started = time.monotonic()
        status = wait(lambda: (st := oracle.status())["tickets"]["passed"] + st["tickets"]["failed"] >= tickets and st,
                      timeout=tickets)
        t = status["tickets"]
        quarantined = [s["peer_id"] for s in status["scouts"] if s.get("reputation") not in (None, "active")]
        return {"tickets": t["passed"] + t["failed"], "failed": t["failed"], "quarantined_scouts": len(quarantined),
                "honest_error_p50": t["honest_error_p50"], "honest_error_max": t["honest_error_max"],
                "tickets_per_s": (t["passed"] + t["failed"]) / (time.monotonic() - started)}
    finally:
        oracle.stop()
        for s in scouts:
            s.stop()


def overhead(root: Path, port: int) -> list[dict]:
    rows = []
    for rate in (0.0, 0.05):
        oracle = Oracle(root, port, "--ticket-rate", str(rate))
        scouts = [scout(root, f"o{i}-{port}", oracle) for i in range(2)]
        try:
            wait(lambda: oracle.status()["coverage"] == [1] * 30)
            wait_ready(oracle.url)
            asyncio.run(run_level(oracle.url, oracle.model, 2, 8, KEY))
            rows.append({"ticket_rate": rate, **asyncio.run(run_level(oracle.url, oracle.model, 4, 48, KEY))})
        finally:
            oracle.stop()
            for s in scouts:
                s.stop()
        port += 1
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for rate in sorted({r["ticket_rate"] for r in rows}):
        pts = [(r["corruption"], r["median_forwards_to_quarantine"]) for r in rows if r["ticket_rate"] == rate and r["caught"]]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"ticket rate {rate:.0%}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("share of outputs corrupted")
    ax.set_ylabel("liar's forwards until quarantine (median)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticket-rates", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    parser.add_argument("--corruption", type=float, nargs="+", default=[1.0, 0.2, 0.05, 0.01])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--budget", type=int, default=100, help="requests per trial before giving up")
    parser.add_argument("--honest-tickets", type=int, default=10000)
    parser.add_argument("--phases", nargs="+", default=["detection", "honest", "overhead"],
                        choices=["detection", "honest", "overhead"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        reference = Oracle(root, 8950)
        ref_scouts = [scout(root, f"ref{i}", reference) for i in range(2)]
        wait(lambda: reference.status()["coverage"] == [1] * 30)
        expected = {q: reference.ask(q) for q in QUESTIONS}
        reference.stop()
        for s in ref_scouts:
            s.stop()
        rows, fp, cost, port = [], None, [], 8960
        if "detection" in args.phases:
            for rate in args.ticket_rates:
                for c in args.corruption:
                    rows.append(detection(root, rate, c, args.trials, args.budget, expected, port))
                    port += 2
            print_table(rows, ["ticket_rate", "corruption", "trials", "caught", "median_forwards_to_quarantine",
                               "worst_forwards_to_quarantine", "wrong_answers_served"])
        if "honest" in args.phases:
            fp = honest(root, args.honest_tickets, 9100)
            print_table([fp], list(fp))
        if "overhead" in args.phases:
            cost = overhead(root, 9110)
            print_table(cost, ["ticket_rate", "aggregate_tok_s", "itl_p50_ms", "ttft_p50_ms"])
    name = "trust" if len(args.phases) == 3 else "trust-" + "-".join(args.phases)
    print("wrote", write_json(name, {"detection": rows, "honest": fp, "overhead": cost}))
    if rows:
        save_plot(plot, rows, "trust")


if __name__ == "__main__":
    main()
