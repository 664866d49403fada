"""Engine speed and memory: our quantized and dense paths, and llama.cpp on the same GGUF if
llama-cpp-python is installed. Each backend runs in its own process so memory is its own.

    python bench/engine.py [--threads 2] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, rss_mb, write_json  # noqa: E402

PROMPT_TOKENS = 200


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_shard(backend: str, new_tokens: int, model: str | None) -> dict:
    import torch

    from shard_common.model.ends import ModelEnds
    from shard_common.model.loader import load_weights
    from shard_common.model.runtime import Runtime
    from shard_common.model.span import Span, SpanRequest

    base = rss_mb()
    weights = load_weights(model)
    runtime = Runtime.pick(backend, "cpu")
    span = Span(weights, 0, weights.config.n_layers, runtime)
    ends = ModelEnds(weights, runtime)
    del weights
    memory = rss_mb() - base
    prompt = [(i * 7919) % 40000 + 100 for i in range(PROMPT_TOKENS)]
    counter = iter(range(10**9))

    def prefill():
        s = f"p{next(counter)}"
        ends.logits(span.forward(ends.embed(prompt), [SpanRequest(s, 0, len(prompt))])[-1:])
        span.free(s)

    prefill()
    t_prefill = timed(prefill)

    def decode(batch: int) -> float:
        sessions = [f"d{next(counter)}" for _ in range(batch)]
        short = prompt[:32]
        for s in sessions:
            span.forward(ends.embed(short), [SpanRequest(s, 0, len(short))])
        tokens = [short[-1]] * batch
        t = time.perf_counter()
        for step in range(new_tokens):
            reqs = [SpanRequest(s, len(short) + step, 1) for s in sessions]
            tokens = ends.logits(span.forward(ends.embed(tokens), reqs)).argmax(-1).tolist()
        elapsed = time.perf_counter() - t
        for s in sessions:
            span.free(s)
        return batch * new_tokens / elapsed

    decode(1)
    b1 = max(decode(1) for _ in range(2))
    b8 = decode(8)

    def verify_vs_steps():
        s = f"v{next(counter)}"
        span.forward(ends.embed(prompt[:64]), [SpanRequest(s, 0, 64)])
        t = time.perf_counter()
        ends.logits(span.forward(ends.embed(prompt[64:69]), [SpanRequest(s, 64, 5)]))
        verify = time.perf_counter() - t
        span.rollback(s, 64)
        t = time.perf_counter()
        for i in range(5):
            ends.logits(span.forward(ends.embed([prompt[64 + i]]), [SpanRequest(s, 64 + i, 1)]))
        singles = time.perf_counter() - t
        span.free(s)
        return verify, singles

    verify, singles = min((verify_vs_steps() for _ in range(3)), key=lambda x: x[0])
    return {
        "backend": f"shard-{backend}", "threads": torch.get_num_threads(),
        "prefill_tok_s": PROMPT_TOKENS / t_prefill, "decode_b1_tok_s": b1, "decode_b8_tok_s": b8,
        "verify5_ms": verify * 1000, "five_steps_ms": singles * 1000, "memory_mb": memory, "rss_mb": rss_mb(),
    }


def bench_llama_cpp(threads: int, new_tokens: int, model: str | None) -> dict:
    from llama_cpp import Llama

    from shard_common.model.loader import default_model_path

    base = rss_mb()
    llm = Llama(model or str(default_model_path()), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512, verbose=False)
    memory = rss_mb() - base
    prompt = [(i * 7919) % 40000 + 100 for i in range(PROMPT_TOKENS)]

    def prefill():
        llm.reset()
        llm.eval(prompt)

    prefill()
    t_prefill = timed(prefill)

    def decode() -> float:
        llm.reset()
        llm.eval(prompt[:32])
        token = prompt[31]
        t = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = int(llm.scores[llm.n_tokens - 1].argmax())
        return new_tokens / (time.perf_counter() - t)

    decode()
    b1 = max(decode() for _ in range(2))
    return {"backend": "llama.cpp", "threads": threads, "prefill_tok_s": PROMPT_TOKENS / t_prefill, "decode_b1_tok_s": b1,
            "memory_mb": memory, "rss_mb": rss_mb()}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = (bench_llama_cpp(args.threads, args.new_tokens, args.model) if args.child == "llama.cpp"
              else bench_shard(args.child, args.new_tokens, args.model))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="a GGUF file or Hugging Face folder (default: the bundled SmolLM2)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    backends = ["quant", "dense"]
    try:
        import llama_cpp  # noqa: F401

        backends.append("llama.cpp")
    except ImportError:
        print("llama-cpp-python not installed: skipping llama.cpp (see README)", file=sys.stderr)
    rows = []
    for b in backends:
        out = subprocess.run([sys.executable, __file__, "--child", b, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                              *(["--model", args.model] if args.model else [])], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    from shard_common.model.loader import resolve_model_path

    path = resolve_model_path(args.model)
    file_mb = (path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))) / 2**20
    for r in rows:
        r["memory_vs_file"] = r["memory_mb"] / file_mb
    ref = next((r for r in rows if r["backend"] == "llama.cpp"), None)
    if ref:
        for r in rows:
            r["b1_vs_llama_cpp"] = r["decode_b1_tok_s"] / ref["decode_b1_tok_s"]
    print_table(rows, ["backend", "threads", "prefill_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "verify5_ms", "five_steps_ms",
                       "memory_mb", "memory_vs_file", "b1_vs_llama_cpp"])
    print("wrote", write_json("engine", {"model": str(path), "file_mb": file_mb, "prompt_tokens": PROMPT_TOKENS,
                                         "new_tokens": args.new_tokens, "results": rows}))


if __name__ == "__main__":
    main()
