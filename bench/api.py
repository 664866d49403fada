"""Concurrent streaming clients against a real ``shard-oracle serve``: aggregate tokens/s, time to
first token and inter-token latency percentiles, for 1, 4 and 16 clients.

    python bench/api.py [--clients 1 4 16] [--max-tokens 64] [--url http://host:port]
    python bench/api.py --vs-llama-server MODEL.gguf [--llama-server BIN] [--threads 2] [--rounds 3]

``--vs-llama-server``: the same clients against the Oracle serving MODEL and against llama.cpp's
own server on the same file and thread count (``llama-server`` with one slot per client and
continuous batching; build it from the llama.cpp sources vendored in the llama-cpp-python sdist,
docs/benchmarks.md says how). Without a ``llama-server`` binary it says so and compares with
llama-cpp-python's single-slot ``llama_cpp.server``.
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
    # cache_prompt: llama-server would otherwise keep each slot's prompt and skip its prefill
    # the next round (the Oracle ignores the field and has no prompt cache).
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "cache_prompt": False}
    start = time.perf_counter()
    arrivals, tokens = [], 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            if b'"content":"' in line and b'"content":""' not in line:
                arrivals.append(time.perf_counter())
            if b'"usage":{' in line:
                usage = json.loads(line[6:]).get("usage") or {}
                tokens = usage.get("completion_tokens", tokens)
    tokens = tokens or len(arrivals)  # a server that sends no usage: count the chunks with text
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


def wait_ready(url: str, timeout: float = 180, path: str = "/health") -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + path, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def llama_cpp_command(binary: str | None, model: str, port: int, threads: int, slots: int, ctx_per_slot: int) -> tuple[list[str], str]:
    """llama.cpp's server on ``model``: ``llama-server`` if found, else the single-slot llama_cpp.server."""
    import shutil

    found = binary or shutil.which("llama-server")
    if found:
        cmd = [found, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-t", str(threads), "-tb", str(threads),
               "-np", str(slots), "-cb", "-c", str(slots * ctx_per_slot)]
        name = f"llama-server ({slots} slots)"
    else:
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"no llama-server binary (pass --llama-server BIN; docs/benchmarks.md says how to build it) and "
                             f"llama-cpp-python's own server cannot run either ({e}: pip install 'llama-cpp-python[server]')")
        print("no llama-server binary (pass --llama-server BIN): comparing with the single-slot llama_cpp.server",
              file=sys.stderr)
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(threads), "--n_ctx", str(ctx_per_slot)]
        name = "llama_cpp.server (1 slot)"
    return cmd, name


def measure(url: str, key: str, clients: list[int], max_tokens: int, warm: bool = True) -> list[dict]:
    import requests

    model = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()["data"][0]["id"]
    if warm:
        asyncio.run(run_level(url, model, 1, 8, key))
    return [asyncio.run(run_level(url, model, n, max_tokens, key)) for n in clients]


def median_of(runs: list[dict], field: str) -> float:
    return statistics.median(r[field] for r in runs)


def versus(args) -> None:
    """Both servers up at once (each idle while the other is measured), measured in alternating
    rounds: on a shared machine whose speed drifts by tens of percent within minutes, a ratio
    from one back-to-back pass is mostly the drift. Each figure is the median over the rounds."""
    key = "sk-oracle-bench-" + "b" * 32
    cmd, name = llama_cpp_command(args.llama_server, args.vs_llama_server, args.port + 1, args.threads, max(args.clients),
                                  args.max_tokens + 256)
    ours_url, theirs_url = f"http://127.0.0.1:{args.port}", f"http://127.0.0.1:{args.port + 1}"
    with tempfile.TemporaryDirectory() as tmp:
        procs = [start_server(args.port, key, tmp, ["--no-store", "--model", args.vs_llama_server, "--speculative", "off",
                                                   "--max-running", str(max(args.clients))]),
                 subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        try:
            wait_ready(ours_url)
            wait_ready(theirs_url, path="/v1/models")
            ours, theirs = [], []
            for round_ in range(args.rounds):
                ours.append(measure(ours_url, key, args.clients, args.max_tokens, warm=round_ == 0))
                theirs.append(measure(theirs_url, key, args.clients, args.max_tokens, warm=round_ == 0))
                print(f"round {round_ + 1}/{args.rounds}: " + ", ".join(
                    f"{a['clients']} clients {a['aggregate_tok_s']:.0f} vs {b['aggregate_tok_s']:.0f} tok/s"
                    for a, b in zip(ours[-1], theirs[-1])), file=sys.stderr)
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)
    rows = []
    for level, n in enumerate(args.clients):
        a, b = [r[level] for r in ours], [r[level] for r in theirs]
        rows.append({"clients": n, "shard_tok_s": median_of(a, "aggregate_tok_s"), "llama_cpp_tok_s": median_of(b, "aggregate_tok_s"),
                     "ratio": statistics.median(x["aggregate_tok_s"] / y["aggregate_tok_s"] for x, y in zip(a, b)),
                     "ratio_min": min(x["aggregate_tok_s"] / y["aggregate_tok_s"] for x, y in zip(a, b)),
                     "ratio_max": max(x["aggregate_tok_s"] / y["aggregate_tok_s"] for x, y in zip(a, b)),
                     "shard_itl_p50_ms": median_of(a, "itl_p50_ms"), "llama_cpp_itl_p50_ms": median_of(b, "itl_p50_ms"),
                     "shard_ttft_p50_ms": median_of(a, "ttft_p50_ms"), "llama_cpp_ttft_p50_ms": median_of(b, "ttft_p50_ms")})
    print(f"shard-oracle serve vs {name}, {args.vs_llama_server}, {args.threads} threads, {args.max_tokens} tokens a stream, "
          f"medians of {args.rounds} alternating rounds (ratio: the median of the rounds' ratios)")
    print_table(rows, list(rows[0]))
    print("wrote", write_json("api-vs-llama-cpp", {"model": args.vs_llama_server, "llama_cpp": name, "threads": args.threads,
                                                   "max_tokens": args.max_tokens, "rounds": args.rounds, "results": rows}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--url", help="an already running Oracle; otherwise one is started")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--key", default=os.environ.get("SHARD_API_KEY"), help="API key for --url (a started server gets its own)")
    parser.add_argument("--vs-llama-server", metavar="MODEL", help="a GGUF file: run the clients against the Oracle and llama.cpp's server on it")
    parser.add_argument("--llama-server", metavar="BIN", help="the llama-server binary (default: llama-server on PATH)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp's threads (the Oracle uses torch's default: every core)")
    parser.add_argument("--rounds", type=int, default=3, help="--vs-llama-server: alternating rounds of both servers; figures are medians")
    args = parser.parse_args()
    if args.vs_llama_server:
        return versus(args)
    proc = None
    url, key = args.url, args.key
    tmp = tempfile.TemporaryDirectory()
    if url is None:
        url = f"http://127.0.0.1:{args.port}"
        key = "sk-oracle-bench-" + "b" * 32
        proc = start_server(args.port, key, tmp.name, ["--no-store"])
    try:
        wait_ready(url)
        rows = measure(url, key, args.clients, args.max_tokens)
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
