"""Load on a real Oracle + local Scouts over HTTP: a concurrency sweep, and a soak.

Clients run closed loops (each sends its next request as soon as the last one ends), half of
them streaming, for a bounded time per level. Per level: requests, errors (by status), tokens/s,
time to first token, inter-token latency and request latency percentiles, and the resident
memory of the Oracle, every Scout and Redis before and after.

    python bench/load.py                                   # sweep 1 2 4 8 16 32 64, 20 s each
    python bench/load.py --soak 600 --soak-concurrency 8   # memory sampled over 10 minutes
    python bench/load.py --url http://host:8000 --key sk-oracle-...   # an Oracle already running
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.api import pct, wait_ready  # noqa: E402
from bench.common import print_table, process_tree_rss_mb, save_plot, write_json  # noqa: E402

KEY = "sk-oracle-bench-" + "l" * 32
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle in three sentences.",
    "List some tips for learning a new language.",
    "What is the capital of France?",
    "Summarize the plot of a detective novel you invent.",
]


async def one_request(session, url: str, model: str, i: int, max_tokens: int, stream: bool) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    record = {"stream": stream, "status": 0, "tokens": 0, "ttft": None, "itl": []}
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as response:
            record["status"] = response.status
            if response.status != 200:
                record["error"] = (await response.text())[:200]
            elif stream:
                arrivals = []
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            record["status"], record["error"] = 500, str(chunk["error"])[:200]
                        elif chunk.get("usage"):
                            record["tokens"] = chunk["usage"]["completion_tokens"]
                        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            arrivals.append(time.perf_counter())
                if arrivals:
                    record["ttft"] = arrivals[0] - start
                    record["itl"] = [b - a for a, b in zip(arrivals, arrivals[1:])]
            else:
                record["tokens"] = (await response.json())["usage"]["completion_tokens"]
    except Exception as e:  # a refused or dropped connection is an error of the run, not of the script
        record["status"], record["error"] = -1, repr(e)[:200]
    record["latency"] = time.perf_counter() - start
    return record


async def closed_loop(url: str, model: str, clients: int, seconds: float, max_tokens: int, key: str, first_id: int = 0) -> list[dict]:
    import aiohttp

    stop_at = time.perf_counter() + seconds
    counter = iter(range(first_id, 1 << 62))
    records: list[dict] = []

    async def client(index: int) -> None:
        while time.perf_counter() < stop_at:
            records.append(await one_request(session, url, model, next(counter), max_tokens, stream=index % 2 == 0))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(client(i) for i in range(clients)))
    return records


def summarize(records: list[dict], elapsed: float) -> dict:
    ok = [r for r in records if r["status"] == 200 and "error" not in r]
    errors: dict[str, int] = {}
    for r in records:
        if r not in ok:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    latency = [r["latency"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "requests": len(records), "errors": sum(errors.values()), "errors_by_status": errors, "tokens": tokens,
        "tok_s": tokens / elapsed, "req_s": len(ok) / elapsed,
        **{f"ttft_p{q}_ms": pct(ttft, q / 100) * 1000 for q in (50, 95, 99)},
        **{f"itl_p{q}_ms": pct(itl, q / 100) * 1000 for q in (50, 95, 99)},
        **{f"latency_p{q}_s": pct(latency, q / 100) for q in (50, 95, 99)},
    }


def memory(pid: int | None) -> dict[str, float]:
    return process_tree_rss_mb(pid) if pid is not None else {}


def sweep(url: str, model: str, key: str, pid: int | None, levels: list[int], seconds: float, max_tokens: int) -> list[dict]:
    rows = []
    for clients in levels:
        before = memory(pid)
        started = time.perf_counter()
        records = asyncio.run(closed_loop(url, model, clients, seconds, max_tokens, key))
        row = {"clients": clients, **summarize(records, time.perf_counter() - started)}
        after = memory(pid)
        row["memory_before_mb"], row["memory_after_mb"] = before, after
        row["oracle_mb"] = after.get("oracle")
        row["scouts_mb"] = sum(v for k, v in after.items() if k.startswith("scout"))
        rows.append(row)
        print(f"{clients:>3} clients: {row['requests']} requests, {row['errors']} errors, {row['tok_s']:.1f} tok/s", flush=True)
    return rows


def soak(url: str, model: str, key: str, pid: int | None, seconds: float, clients: int, max_tokens: int, every: float) -> dict:
    """Load for ``seconds`` in slices of ``every``; memory after each slice."""
    samples, records, started = [], [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        chunk = asyncio.run(closed_loop(url, model, clients, min(every, seconds - (time.perf_counter() - started)), max_tokens, key,
                                        first_id=len(records)))
        records += chunk
        mem = memory(pid)
        samples.append({"elapsed_s": time.perf_counter() - started, "requests": len(records),
                        "errors": sum(1 for r in records if r["status"] != 200 or "error" in r), **mem})
        print(f"soak {samples[-1]['elapsed_s']:.0f}s: {len(records)} requests, {samples[-1]['errors']} errors, "
              + ", ".join(f"{k} {v:.0f} MB" for k, v in mem.items()), flush=True)
    summary = summarize(records, time.perf_counter() - started)
    # Growth per 1000 requests, from the second sample on (the first includes warm-up allocations).
    growth = {}
    if len(samples) >= 3:
        first, last = samples[1], samples[-1]
        n = max(1, last["requests"] - first["requests"])
        growth = {k: (last[k] - first[k]) / n * 1000 for k in last if k in first and k not in ("elapsed_s", "requests", "errors")}
    return {"clients": clients, "seconds": seconds, "summary": summary, "samples": samples, "mb_per_1000_requests": growth}


def draw_soak(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in [k for k in samples[-1] if k not in ("elapsed_s", "requests", "errors")]:
        ax.plot([s["requests"] for s in samples], [s.get(name) for s in samples], marker=".", label=name)
    ax.set_xlabel("requests served")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(f"Soak: {result['clients']} clients for {result['seconds']:.0f} s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="load time per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--scouts", type=int, default=2, help="local Scouts of the started Oracle (0: blocks in the Oracle)")
    parser.add_argument("--soak", type=float, default=0.0, help="instead of the sweep: load this many seconds, memory sampled")
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--sample-every", type=float, default=30.0, help="seconds between the soak's memory samples")
    parser.add_argument("--url", help="an already running Oracle (memory is then not measured); otherwise one is started")
    parser.add_argument("--key", default=os.environ.get("SHARD_API_KEY"))
    parser.add_argument("--port", type=int, default=8767)
    args = parser.parse_args()

    import subprocess

    import requests

    proc, url, key = None, args.url, args.key
    tmp = tempfile.TemporaryDirectory()
    if url is None:
        url, key = f"http://127.0.0.1:{args.port}", KEY
        extra = ["--local-scouts", str(args.scouts)] if args.scouts else []
        proc = subprocess.Popen([sys.executable, "-m", "oracle.cli", "serve", "--port", str(args.port), "--data-dir", tmp.name,
                                 "--p2p-port", str(args.port + 1), *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "SHARD_ADMIN_KEY": key})
    try:
        wait_ready(url, timeout=300)
        model = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()["data"][0]["id"]
        asyncio.run(closed_loop(url, model, 2, 5, 8, key))  # warm-up
        pid = proc.pid if proc else None
        setup = {"scouts": args.scouts if proc else None, "max_tokens": args.max_tokens}
        if args.soak:
            result = soak(url, model, key, pid, args.soak, args.soak_concurrency, args.max_tokens, args.sample_every)
            print_table(result["samples"], list(result["samples"][0]))
            print("MB per 1000 requests:", {k: round(v, 2) for k, v in result["mb_per_1000_requests"].items()})
            print("wrote", write_json("load_soak", {**setup, **result}))
            save_plot(draw_soak, result, "load_soak")
            return
        rows = sweep(url, model, key, pid, args.concurrency, args.seconds, args.max_tokens)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        tmp.cleanup()
    print_table(rows, ["clients", "requests", "errors", "tok_s", "req_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms",
                       "itl_p95_ms", "itl_p99_ms", "latency_p99_s", "oracle_mb", "scouts_mb"])
    print("wrote", write_json("load", {**setup, "seconds_per_level": args.seconds, "results": rows}))


if __name__ == "__main__":
    main()
