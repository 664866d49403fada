"""Speculative decoding over a chain of Scouts with added per-hop latency.

Oracle + 3 local Scouts; every Scout's data-plane reply is delayed by 0, 20, 50 and 100 ms
(``shard-scout --simulate-latency-ms``: this machine's kernel has no netem). For each latency,
the same greedy prompts are decoded plainly, with prompt lookup (ngram) and, with ``--draft``,
with a draft Scout running the whole model: tokens/s, acceptance rate, tokens per pass, by
prompt kind. Prints a table, writes bench/results/speculative.json and speculative.png.

    python bench/speculative.py [--latencies 0 20 50 100] [--max-tokens 48] [--draft]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests  # noqa: E402

from bench.api import wait_ready  # noqa: E402
from bench.common import print_table, save_plot, write_json  # noqa: E402

KEY = "sk-oracle-bench-" + "p" * 32
ARTICLE = ("The city council met on Tuesday to discuss the new bicycle lanes on Main Street. Supporters said the "
           "lanes would make cycling safer and reduce traffic, while some shop owners worried that removing parking "
           "spaces would hurt their business. After a long debate, the council voted seven to two to build the lanes "
           "next spring and to review their effect on local shops after one year.")
CODE = ("def total_price(items):\n    total = 0\n    for item in items:\n        total = total + item.price * item.count\n"
        "    return total\n")
PROMPTS = {
    "summarize": [f"Summarize this article in two sentences:\n\n{ARTICLE}",
                  f"Give a one-paragraph summary of the following text, keeping its key facts:\n\n{ARTICLE}"],
    "edit": [f"Fix the grammar and keep everything else the same: {ARTICLE.replace('said', 'sayed').replace('were', 'was')}",
             f"Rename the function total_price to order_total and return the code:\n\n{CODE}"],
    "chat": ["Write a short poem about the sea.", "Explain in a few sentences why the sky is blue."],
}


def start(port: int, data_dir: str, latency_ms: float, scouts: int, draft: bool) -> subprocess.Popen:
    extra = ["--local-scouts", str(scouts), "--p2p-port", str(port + 100)] + (["--local-draft-scouts", "1"] if draft else [])
    env = {**os.environ, "SHARD_ADMIN_KEY": KEY, "SHARD_SIMULATE_LATENCY_MS": str(latency_ms)}
    return subprocess.Popen([sys.executable, "-m", "oracle.cli", "serve", "--port", str(port), "--data-dir", data_dir,
                             "--no-store", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def speculation(url: str) -> dict:
    return requests.get(url + "/v1/cluster/status", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["speculative"]


def run_mode(url: str, model: str, mode: str, kind: str, max_tokens: int) -> dict:
    tokens, elapsed = 0, 0.0
    before = speculation(url)
    for prompt in PROMPTS[kind]:
        t0 = time.perf_counter()
        r = requests.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=600, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "speculative": mode}).json()
        elapsed += time.perf_counter() - t0
        tokens += r["usage"]["completion_tokens"]
    after = speculation(url)
    drafted, accepted = after["drafted"] - before["drafted"], after["accepted"] - before["accepted"]
    passes, emitted = after["passes"] - before["passes"], after["emitted"] - before["emitted"]
    trips = passes + (tokens - emitted)  # verification passes, and plain steps of one token each
    row = {"kind": kind, "mode": mode, "tokens": tokens, "tok_s": tokens / elapsed,
           "acceptance": accepted / drafted if drafted else None, "tokens_per_pass": tokens / trips if trips else None,
           "ms_per_pass": elapsed * 1000 / trips if trips else None}
    # Where a draft Scout's time goes: the engine waiting for drafts (not hidden behind the previous
    # verification), per pass; the draft Scout's own compute, per draft.
    b, a = before["drafter_stats"].get("scout"), after["drafter_stats"].get("scout")
    if mode == "scout" and b and a and a["drafts"] > b["drafts"]:
        row["draft_wait_ms"] = (a["wait_ms"] - b["wait_ms"]) / max(1, passes)
        row["draft_compute_ms"] = (a["draft_compute_ms"] - b["draft_compute_ms"]) / (a["drafts"] - b["drafts"])
        row["drafted_ahead_used"] = (a["ahead_used"] - b["ahead_used"]) / max(1, a["drafted_ahead"] - b["drafted_ahead"])
    return row


def measure(latency: float, scouts: int, max_tokens: int, draft: bool, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        proc = start(port, tmp, latency, scouts, draft)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url)
            model = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()["data"][0]["id"]
            run_mode(url, model, "off", "chat", 8)  # warm-up
            rows = []
            for kind in PROMPTS:
                for mode in ["off", "ngram"] + (["scout"] if draft else []):
                    rows.append({"latency_ms": latency, **run_mode(url, model, mode, kind, max_tokens)})
            for r in rows:
                plain = next(p for p in rows if p["kind"] == r["kind"] and p["mode"] == "off")
                r["speedup"] = r["tok_s"] / plain["tok_s"]
            return rows
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(PROMPTS)
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.5), sharey=True)
    for ax, kind in zip(axes, kinds):
        for mode in sorted({r["mode"] for r in rows}):
            pts = sorted((r["latency_ms"], r["tok_s"]) for r in rows if r["kind"] == kind and r["mode"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.set_title(kind)
        ax.set_xlabel("added latency per hop (ms)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tokens/s (greedy, 1 stream)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latencies", type=float, nargs="+", default=[0, 20, 50, 100])
    parser.add_argument("--scouts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--draft", action="store_true", help="also start a draft Scout and measure mode 'scout'")
    args = parser.parse_args()
    rows = []
    for i, latency in enumerate(args.latencies):
        rows += measure(latency, args.scouts, args.max_tokens, args.draft, 8800 + i)
    print_table(rows, ["latency_ms", "kind", "mode", "tokens", "tok_s", "speedup", "acceptance", "tokens_per_pass", "ms_per_pass",
                       "draft_wait_ms", "draft_compute_ms", "drafted_ahead_used"])
    print("wrote", write_json("speculative", {"max_tokens": args.max_tokens, "scouts": args.scouts, "results": rows}))
    save_plot(plot, rows, "speculative")


if __name__ == "__main__":
    main()
