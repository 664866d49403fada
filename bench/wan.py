"""The swarm over simulated WAN links: an Oracle and 3 local Scouts (one thread each) plus a draft
Scout, every data-plane frame delayed by a one-way link delay at send (``SHARD_SIMULATE_LINK_MS``,
shard_common/link_sim.py, set for the Oracle and inherited by its Scouts), so each topology pays
for the trips it makes: a hub step through n Scouts costs 2n one-way delays.

Per delay, in one run: single-stream greedy tokens/s with speculation off, with prompt lookup and
with the draft Scout; 16-stream aggregate tokens/s (speculation off), lockstep (one batch in
flight, ``--pipeline-depth 1``) and pipelined (by default 4 micro-batches: the depth an Oracle
gives a route through 3 remote Scouts, which these simulate); data-plane round trips per token.
Each for both topologies: hub (``serve --no-chain``: Oracle → Scout → Oracle per hop, 2n one-way
trips a step) and chain (Oracle → S1 → S2 → S3 → Oracle, n + 1). Audits are off (``--no-audits``)
in both: a Scout on probation is checked on every forward, and checked forwards go the hub way.
Prints a table, writes bench/results/wan.json and wan.png (docs/img/wan.png is a copy).

    python bench/wan.py [--delays 0 10 25 50] [--max-tokens 32] [--streams 16] [--depths 1 4] [--topologies hub chain]
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
from bench.common import print_table, save_plot, write_json  # noqa: E402

KEY = "sk-oracle-bench-" + "w" * 32
HEADERS = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["Summarize in one sentence: the council voted to build bicycle lanes on Main Street next spring.",
           "Write a short poem about the sea."]


def status(url: str) -> dict:
    return requests.get(url + "/v1/cluster/status", headers=HEADERS, timeout=10).json()


def trips_and_tokens(url: str) -> tuple[int, int]:
    s = status(url)
    return s["data_plane"]["round_trips"], s["tokens_generated"]


def single_stream(url: str, model: str, mode: str, max_tokens: int) -> dict:
    trips0, tokens0 = trips_and_tokens(url)
    tokens, elapsed = 0, 0.0
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        r = requests.post(url + "/v1/chat/completions", headers=HEADERS, timeout=900, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": max_tokens,
            "speculative": mode}).json()
        elapsed += time.perf_counter() - t0
        tokens += r["usage"]["completion_tokens"]
    trips1, tokens1 = trips_and_tokens(url)
    return {"tok_s": tokens / elapsed, "round_trips_per_token": (trips1 - trips0) / max(1, tokens1 - tokens0)}


def hop_overhead(s: dict) -> float | None:
    """Time per hop that is not a Scout computing, so far: chained steps' wall time minus compute
    per hop, or the hub forwards' round trip minus compute (span Scouts only)."""
    chain = s["data_plane"].get("chain") or {}
    if chain.get("overhead_ms_per_hop") is not None:
        return chain["overhead_ms_per_hop"]
    hub = [x["overhead_ms"] for x in s["scouts"] if x.get("role") == "span" and x.get("overhead_ms") is not None]
    return sum(hub) / len(hub) if hub else None


def measure(delay_ms: float, max_tokens: int, streams: int, port: int, depth: int, topology: str) -> list[dict]:
    """Single streams (lockstep only: one stream has nothing to overlap) and ``streams`` at once."""
    schedule = "lockstep" if depth == 1 else f"pipelined, depth {depth}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "SHARD_ADMIN_KEY": KEY, "SHARD_SIMULATE_LINK_MS": str(delay_ms)}
        proc = subprocess.Popen([sys.executable, "-m", "oracle.cli", "serve", "--port", str(port), "--data-dir", tmp, "--no-store",
                                 "--local-scouts", "3", "--local-draft-scouts", "1", "--p2p-port", str(port + 100),
                                 "--data-port", "0", "--speculative", "off", "--pipeline-depth", str(depth), "--no-audits",
                                 *(["--no-chain"] if topology == "hub" else [])],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, timeout=300)
            deadline = time.monotonic() + 300
            while not any(s.get("role") == "draft" and s["state"] == "active" for s in status(url)["scouts"]):
                if time.monotonic() > deadline:
                    raise TimeoutError("the draft Scout did not join")
                time.sleep(1)
            model = requests.get(url + "/v1/models", headers=HEADERS, timeout=5).json()["data"][0]["id"]
            single_stream(url, model, "off", 4)  # warm-up
            rows = []
            for mode in ("off", "ngram", "scout") if depth == 1 else ():
                rows.append({"delay_ms": delay_ms, "streams": 1, "speculative": mode, "topology": topology, "schedule": "lockstep",
                             **single_stream(url, model, mode, max_tokens)})
                if mode == "off":
                    rows[-1]["hop_overhead_ms"] = hop_overhead(status(url))
            trips0, tokens0 = trips_and_tokens(url)
            level = asyncio.run(run_level(url, model, streams, max_tokens, KEY))
            trips1, tokens1 = trips_and_tokens(url)
            rows.append({"delay_ms": delay_ms, "streams": streams, "speculative": "off", "topology": topology, "schedule": schedule,
                         "tok_s": level["aggregate_tok_s"], "round_trips_per_token": (trips1 - trips0) / max(1, tokens1 - tokens0)})
            return rows
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for streams, mode, schedule, topology in sorted({(r["streams"], r["speculative"], r["schedule"], r["topology"]) for r in rows}):
        pts = sorted((r["delay_ms"], r["tok_s"]) for r in rows
                     if (r["streams"], r["speculative"], r["schedule"], r["topology"]) == (streams, mode, schedule, topology))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if topology == "chain" else "--",
                label=f"{topology}: {streams} stream{'s' * (streams > 1)}, {mode}" + (f", {schedule}" if streams > 1 else ""))
    ax.set_xlabel("one-way delay per link (ms)")
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", type=float, nargs="+", default=[0, 10, 25, 50])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 4], help="pipeline depths for the streams (1: lockstep)")
    parser.add_argument("--topologies", nargs="+", default=["hub", "chain"], choices=["hub", "chain"])
    args = parser.parse_args()
    rows = []
    for i, delay in enumerate(args.delays):
        for j, depth in enumerate(args.depths):
            # Side by side: the topologies one after the other at each setting.
            for k, topology in enumerate(args.topologies):
                rows += measure(delay, args.max_tokens, args.streams, 8700 + 16 * i + 4 * j + 2 * k, depth, topology)
    by_setting = {(r["delay_ms"], r["streams"], r["speculative"], r["schedule"]): r["tok_s"] for r in rows if r["topology"] == "hub"}
    for r in rows:
        hub = by_setting.get((r["delay_ms"], r["streams"], r["speculative"], r["schedule"]))
        r["vs_hub"] = r["tok_s"] / hub if hub else None
    print_table(rows, ["delay_ms", "streams", "speculative", "topology", "schedule", "tok_s", "vs_hub", "round_trips_per_token",
                       "hop_overhead_ms"])
    print("wrote", write_json("wan", {"max_tokens": args.max_tokens, "scouts": 3, "results": rows}))
    save_plot(plot, rows, "wan")


if __name__ == "__main__":
    main()
