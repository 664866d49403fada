"""Pipelined micro-batches vs lockstep, side by side in one run: 16 concurrent streams through an
Oracle and 2 local Scouts (one thread each on this machine's cores), one batch in flight
(``--pipeline-depth 1``) vs several (the default: one more than the Scouts on a route, or the
depths given), and the same streams through a single process using every core.

    python bench/pipeline.py [--streams 16] [--max-tokens 64] [--scouts 2] [--depths 2 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402
from bench.swarm import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--scouts", type=int, default=2)
    parser.add_argument("--depths", type=int, nargs="*", default=[], help="also these fixed depths (default: only auto)")
    args = parser.parse_args()
    off = ["--speculative", "off"]
    rows = measure("single process", off, 8801, [args.streams], args.max_tokens, 0)
    setups = [("lockstep", 1), ("pipelined (auto depth)", 0)] + [(f"pipelined, depth {d}", d) for d in args.depths]
    for i, (name, depth) in enumerate(setups):
        extra = [*off, "--local-scouts", str(args.scouts), "--pipeline-depth", str(depth), "--p2p-port", str(8810 + i)]
        rows += measure(f"{args.scouts} scouts, {name}", extra, 8802 + i, [args.streams], args.max_tokens, args.scouts)
    single, lockstep = rows[0]["aggregate_tok_s"], rows[1]["aggregate_tok_s"]
    for r in rows:
        r["vs_single"] = r["aggregate_tok_s"] / single
        r["vs_lockstep"] = r["aggregate_tok_s"] / lockstep
    print_table(rows, ["setup", "clients", "aggregate_tok_s", "vs_lockstep", "vs_single", "itl_p50_ms", "round_trips_per_token",
                       "hop_overhead_ms"])
    print("wrote", write_json("pipeline", {"streams": args.streams, "max_tokens": args.max_tokens, "scouts": args.scouts,
                                           "results": rows}))


if __name__ == "__main__":
    main()
