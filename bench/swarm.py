"""Single process vs Oracle + 2 local Scouts, side by side in one run: decode tokens/s at 1 and 8
concurrent streams, per-hop overhead (round trip minus the Scout's compute), bytes on the wire
per generated token.

    python bench/swarm.py [--max-tokens 64] [--scouts 2]
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
                             "--no-store", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SHARD_ADMIN_KEY": KEY})


def measure(name: str, extra: list[str], port: int, clients: list[int], max_tokens: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = start(port, tmp, extra)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            headers = {"Authorization": f"Bearer {KEY}"}
            model = requests.get(url + "/v1/models", headers=headers, timeout=5).json()["data"][0]["id"]
            asyncio.run(run_level(url, model, 1, 8, KEY))  # warm-up
            rows = []
            for n in clients:
                before = requests.get(url + "/v1/cluster/status", headers=headers, timeout=5).json()
                row = asyncio.run(run_level(url, model, n, max_tokens, KEY))
                after = requests.get(url + "/v1/cluster/status", headers=headers, timeout=5).json()
                row = {"setup": name, **row}
                if after["mode"] == "swarm":
                    hops = {s["peer_id"]: s for s in after["scouts"]}
                    prev = {s["peer_id"]: s for s in before["scouts"]}
                    def delta(field: str) -> int:
                        return sum(h.get(field, 0) - prev.get(p, {}).get(field, 0) for p, h in hops.items())

                    forwards = delta("forwards")
                    overhead = [h["overhead_ms"] for h in hops.values() if h.get("overhead_ms") is not None]
                    row["hop_overhead_ms"] = sum(overhead) / len(overhead) if overhead else None
                    row["wire_bytes_per_token"] = delta("wire_bytes") / row["tokens"]
                    row["forwards"] = forwards
                rows.append(row)
            return rows
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--scouts", type=int, default=2)
    parser.add_argument("--wire-dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    rows = measure("single process", [], 8781, args.clients, args.max_tokens)
    for i, dtype in enumerate(args.wire_dtypes):
        rows += measure(f"oracle + {args.scouts} scouts, {dtype} wire", ["--local-scouts", str(args.scouts), "--wire-dtype", dtype,
                                                                      "--p2p-port", str(8790 + i)], 8782 + i, args.clients, args.max_tokens)
    single = {r["clients"]: r["aggregate_tok_s"] for r in rows if r["setup"] == "single process"}
    for r in rows:
        r["vs_single"] = r["aggregate_tok_s"] / single[r["clients"]]
    print_table(rows, ["setup", "clients", "aggregate_tok_s", "vs_single", "itl_p50_ms", "ttft_p50_ms", "hop_overhead_ms",
                       "wire_bytes_per_token"])
    print("wrote", write_json("swarm", {"max_tokens": args.max_tokens, "results": rows}))


if __name__ == "__main__":
    main()
