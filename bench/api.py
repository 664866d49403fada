"""Concurrent streaming clients against a real ``shard-oracle serve``: aggregate tokens/s, time to
first token and inter-token latency percentiles, for 1, 4 and 16 clients.

    python bench/api.py [--clients 1 4 16] [--max-tokens 64] [--url http://host:port]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe the water cycle.",
    "List some tips for learning a new language.",
]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one_client(session, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming request read as raw SSE (an SDK's per-chunk parsing would eat the CPU the
    server needs on a small machine)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            if b'"content":"' in line and b'"content":""' not in line:
                arrivals.append(time.perf_counter())
            elif b'"usage":{' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return {"ttft": arrivals[0] - start, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens, "end": time.perf_counter()}


async def run_level(url: str, model: str, clients: int, max_tokens: int, key: str) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[one_client(session, url, model, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(clients)])
    elapsed = max(r["end"] for r in results) - t0
    itl = [x for r in results for x in r["itl"]]
    ttft = [r["ttft"] for r in results]
    total = sum(r["tokens"] for r in results)
    return {
        "clients": clients, "tokens": total, "aggregate_tok_s": total / elapsed,
        "per_stream_tok_s": total / elapsed / clients,
        "ttft_p50_ms": pct(ttft, 0.5) * 1000, "ttft_p95_ms": pct(ttft, 0.95) * 1000,
        "itl_p50_ms": pct(itl, 0.5) * 1000, "itl_p95_ms": pct(itl, 0.95) * 1000, "itl_p99_ms": pct(itl, 0.99) * 1000,
        "itl_mean_ms": statistics.fmean(itl) * 1000 if itl else float("nan"),
    }


def start_server(port: int, key: str, data_dir: str, extra: list[str]) -> subprocess.Popen:
    env = {**os.environ, "SHARD_ADMIN_KEY": key}
    return subprocess.Popen([sys.executable, "-m", "oracle.cli", "serve", "--port", str(port), "--data-dir", data_dir, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def wait_ready(url: str, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--url", help="an already running Oracle; otherwise one is started")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default=os.environ.get("SHARD_API_KEY"), help="API key for --url (a started server gets its own)")
    args = parser.parse_args()
    proc = None
    url, key = args.url, args.key
    tmp = tempfile.TemporaryDirectory()
    if url is None:
        url = f"http://127.0.0.1:{args.port}"
        key = "sk-oracle-bench-" + "b" * 32
        proc = start_server(args.port, key, tmp.name, ["--no-store"])
    try:
        wait_ready(url)
        import requests

        model = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()["data"][0]["id"]
        asyncio.run(run_level(url, model, 1, 8, key))  # warm-up
        rows = [asyncio.run(run_level(url, model, n, args.max_tokens, key)) for n in args.clients]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        tmp.cleanup()
    single = rows[0]["aggregate_tok_s"]
    for r in rows:
        r["vs_single_stream"] = r["aggregate_tok_s"] / single
    print_table(rows, ["clients", "tokens", "aggregate_tok_s", "per_stream_tok_s", "vs_single_stream", "ttft_p50_ms", "ttft_p95_ms",
                       "itl_p50_ms", "itl_p95_ms", "itl_p99_ms"])
    print("wrote", write_json("api", {"max_tokens": args.max_tokens, "results": rows}))


if __name__ == "__main__":
    main()
