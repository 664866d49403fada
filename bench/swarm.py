"""Single process vs Oracle + local Scouts, side by side in one run: decode tokens/s at 1 and 8
concurrent streams, data-plane round trips per generated token and per pass, per-hop overhead
(round trip minus the Scout's compute), bytes on the wire per token; and the same swarm with
cache operations sent eagerly (``--eager-cache-ops``: every rollback and free its own round trip,
as before they rode on forwards), so the ratio is measured side by side.

    python bench/swarm.py [--max-tokens 64] [--scouts 3] [--clients 1 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.api import run_level, wait_ready  # noqa: E402
from bench.common import print_table, write_json  # noqa: E402

KEY = "sk-oracle-bench-" + "s" * 32


def start(port: int, data_dir: str, extra: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "oracle.cli", "serve", "--port", str(port), "--data-dir", data_dir,
                             "--no-store", "--data-port", "0", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SHARD_ADMIN_KEY": KEY})


def status(url: str) -> dict:
    return requests.get(url + "/v1/cluster/status", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()


def wait_for_chain(url: str, hops: int) -> None:
    import time

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        st = status(url)
        if st["mode"] == "local" or (min(st["coverage"]) >= 1 and len(st["chain"]) >= hops):
            return
        time.sleep(0.5)
    raise TimeoutError("the swarm did not form")


def measure(name: str, extra: list[str], port: int, clients: list[int], max_tokens: int, hops: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = start(port, tmp, extra)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            wait_for_chain(url, hops)
            model = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()["data"][0]["id"]
            asyncio.run(run_level(url, model, 1, 8, KEY))  # warm-up
            rows = []
            for n in clients:
                before = status(url)
                row = {"setup": name, **asyncio.run(run_level(url, model, n, max_tokens, KEY))}
                after = status(url)
                if after["mode"] == "swarm":
                    prev = {s["peer_id"]: s for s in before["scouts"]}
                    hops_now = {s["peer_id"]: s for s in after["scouts"] if s.get("role", "span") == "span"}

                    def delta(field: str) -> float:
                        return sum((h.get(field) or 0) - (prev.get(p, {}).get(field) or 0) for p, h in hops_now.items())

                    dp, dp0 = after["data_plane"], before["data_plane"]
                    trips, passes = dp["round_trips"] - dp0["round_trips"], dp["passes"] - dp0["passes"]
                    overhead = [h["overhead_ms"] for h in hops_now.values() if h.get("overhead_ms") is not None]
                    row.update(round_trips_per_token=trips / row["tokens"], round_trips_per_pass=trips / passes if passes else None,
                               tokens_per_pass=row["tokens"] / passes if passes else None,
                               hop_overhead_ms=sum(overhead) / len(overhead) if overhead else None,
                               wire_bytes_per_token=delta("wire_bytes") / row["tokens"], hops=len(after["chain"]))
                rows.append(row)
            return rows
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--scouts", type=int, default=3)
    parser.add_argument("--speculative", default="ngram", choices=["off", "ngram"])
    args = parser.parse_args()
    spec = ["--speculative", args.speculative]
    rows = measure("single process", spec, 8781, args.clients, args.max_tokens, 0)
    swarm = ["--local-scouts", str(args.scouts), *spec]
    rows += measure(f"oracle + {args.scouts} scouts", [*swarm, "--p2p-port", "8790"], 8782, args.clients, args.max_tokens,
                    args.scouts)
    rows += measure(f"oracle + {args.scouts} scouts, eager cache ops", [*swarm, "--eager-cache-ops", "--p2p-port", "8791"], 8783,
                    args.clients, args.max_tokens, args.scouts)
    single = {r["clients"]: r["aggregate_tok_s"] for r in rows if r["setup"] == "single process"}
    for r in rows:
        r["vs_single"] = r["aggregate_tok_s"] / single[r["clients"]]
    print_table(rows, ["setup", "clients", "aggregate_tok_s", "vs_single", "round_trips_per_token", "round_trips_per_pass",
                       "tokens_per_pass", "hop_overhead_ms", "itl_p50_ms", "wire_bytes_per_token"])
    print("wrote", write_json("swarm", {"max_tokens": args.max_tokens, "speculative": args.speculative, "results": rows}))


if __name__ == "__main__":
    main()
