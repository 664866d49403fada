"""Engine speed and memory: our quantized path (native CPU kernels between the matmuls where they
build, and the same with eager torch ops), the dense reference, and llama.cpp on the same GGUF if
llama-cpp-python is installed. Each backend runs in its own process so memory is its own.
On ``--device cuda``: the int4 path against plain torch (dequantized weights, bf16 ``F.linear``)
on the same model, decode at batch 1, 8 and 32, and GPU memory.

    python bench/engine.py [--threads 2] [--new-tokens 128] [--rounds 3] [--model PATH] [--device cuda --quantize q4_0]
"""

from __future__ import annotations

import argparse
import contextlib
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


def bench_shard(backend: str, new_tokens: int, model: str | None, device: str = "cpu", quantize: str | None = None,
                batches: tuple[int, ...] = (8,), profile_ops: bool = False) -> dict:
    import torch

    from shard_common.model.ends import ModelEnds
    from shard_common.model.loader import load_weights
    from shard_common.model.runtime import Runtime
    from shard_common.model.span import Span, SpanRequest

    base = rss_mb()
    weights = load_weights(model, quantize=quantize)
    # "quant-eager": the quant backend with eager torch ops between the matmuls (no native kernels).
    eager = backend.endswith("-eager")
    runtime = Runtime.pick(backend.removesuffix("-eager"), device, "eager" if eager else "auto")
    span = Span(weights, 0, weights.config.n_layers, runtime)
    ends = ModelEnds(weights, runtime)
    del weights
    memory = rss_mb() - base
    vocab = span.config.vocab_size
    on_gpu = runtime.device.type == "cuda"
    gpu_weights_mb = torch.cuda.memory_allocated(runtime.device) / 2**20 if on_gpu else None
    prompt = [(i * 7919) % min(40000, vocab - 100) + 100 for i in range(PROMPT_TOKENS)]
    counter = iter(range(10**9))

    def prefill():
        s = f"p{next(counter)}"
        ends.logits(span.forward(ends.embed(prompt), [SpanRequest(s, 0, len(prompt))])[-1:])
        span.free(s)

    prefill()
    t_prefill = timed(prefill)

    def decode(batch: int) -> float:
        sessions = [f"d{next(counter)}" for _ in range(batch)]
        return batch * new_tokens / greedy_decode(span, ends, prompt[:32], sessions, new_tokens)

    decode(1)
    b1 = max(decode(1) for _ in range(2))
    batched = {f"decode_b{b}_tok_s": max(decode(b) for _ in range(2)) for b in batches}  # best of two: bursts of noise here

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
    profile = [profile_decode(span, ends, prompt[:32], min(new_tokens, 32), b) for b in (1, max(batches))] if profile_ops else None
    return {
        "backend": f"shard-{backend}", "kernels": runtime.kernels, "device": str(runtime.device), "threads": torch.get_num_threads(),
        "prefill_tok_s": PROMPT_TOKENS / t_prefill, "decode_b1_tok_s": b1, **batched,
        "verify5_ms": verify * 1000, "five_steps_ms": singles * 1000, "memory_mb": memory, "rss_mb": rss_mb(),
        # KV cache of one session at 4k positions (sliding-window blocks keep a ring, not 4k).
        "kv_mb_per_session_4k": span.kv.bytes_for(min(4096, span.config.context_length)) / 2**20,
        **({"gpu_weights_mb": gpu_weights_mb, "gpu_peak_mb": torch.cuda.max_memory_allocated(runtime.device) / 2**20} if on_gpu else {}),
        **({"profile": profile} if profile else {}),
    }


def greedy_decode(span, ends, prompt: list[int], sessions: list[str], steps: int, around=None) -> float:
    """Prefill ``prompt`` into each session, then time ``steps`` batched greedy decode steps
    (inside the context manager ``around``, if any); the sessions are freed. Returns seconds."""
    from shard_common.model.span import SpanRequest

    for s in sessions:
        span.forward(ends.embed(prompt), [SpanRequest(s, 0, len(prompt))])
    tokens = [prompt[-1]] * len(sessions)
    with around or contextlib.nullcontext():
        t = time.perf_counter()
        for step in range(steps):
            reqs = [SpanRequest(s, len(prompt) + step, 1) for s in sessions]
            tokens = ends.logits(span.forward(ends.embed(tokens), reqs)).argmax(-1).tolist()
        elapsed = time.perf_counter() - t
    for s in sessions:
        span.free(s)
    return elapsed


def profile_decode(span, ends, prompt: list[int], steps: int, batch: int) -> dict:
    """Decode of ``batch`` sessions under the torch profiler: ops per step and where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])
    elapsed = greedy_decode(span, ends, prompt, [f"prof{i}" for i in range(batch)], steps, around=prof)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total_self = sum(e.self_cpu_time_total for e in events)
    ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "batch": batch,
        "ms_per_step": elapsed * 1000 / steps,  # under the profiler, which adds its own cost per op
        "aten_ops_per_step": sum(e.count for e in events) / steps,
        "top": [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                 "share": e.self_cpu_time_total / max(total_self, 1)} for e in ops[:15]],
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
              else bench_shard(args.child, args.new_tokens, args.model, args.device, args.quantize, tuple(args.batches),
                               args.profile and args.child.startswith("quant")))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model", default=None, help="a GGUF file or Hugging Face folder (default: the bundled SmolLM2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--quantize", default=None, choices=["q8_0", "q4_0", "q4_1"], help="quantize a Hugging Face folder at load")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes beside 1 (default 8; 8 32 on cuda)")
    parser.add_argument("--name", default="engine", help="results file name under bench/results")
    parser.add_argument("--profile", action="store_true",
                        help="also profile decode of the quant backend at batch 1 and the largest --batches: aten ops per step and the top ops by time")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every backend this many times, alternating, and report each round (this machine's speed drifts)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batches = args.batches or ([8, 32] if args.device.startswith("cuda") else [8])
    if args.child:
        return child(args)
    from shard_common.model.loader import resolve_model_path

    path = resolve_model_path(args.model)
    if args.device.startswith("cuda"):
        backends = ["quant", "dense-bf16"]  # the int4 kernels vs plain torch on the same shapes
    else:
        backends = ["quant", "quant-eager", "dense"]
        try:
            if not path.is_file():
                raise ImportError("llama.cpp reads GGUF files, not Hugging Face folders")
            import llama_cpp  # noqa: F401

            backends.append("llama.cpp")
        except ImportError as e:
            print(f"skipping llama.cpp: {e} (see README)", file=sys.stderr)
    rows = []
    for round_, b in ((r, b) for r in range(1, args.rounds + 1) for b in backends):
        out = subprocess.run([sys.executable, __file__, "--child", b, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                              "--device", args.device, "--batches", *map(str, args.batches), *(["--profile"] if args.profile else []),
                              *(["--model", args.model] if args.model else []), *(["--quantize", args.quantize] if args.quantize else [])],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{b} failed:\n{out.stderr[-4000:]}")
        rows.append({"round": round_, **json.loads(out.stdout.strip().splitlines()[-1])})
    file_mb = (path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))) / 2**20
    for r in rows:
        r["memory_vs_file"] = r["memory_mb"] / file_mb
    ref = None
    for r in rows:  # each round against its own reference run
        ref = next((x for x in rows if x["round"] == r["round"] and x["backend"] in ("llama.cpp", "shard-dense-bf16")), None)
        if ref:
            r["b1_vs_" + ref["backend"]] = r["decode_b1_tok_s"] / ref["decode_b1_tok_s"]
    print_table(rows, ["round", "backend", "kernels", "device", "threads", "prefill_tok_s", "decode_b1_tok_s", *(f"decode_b{b}_tok_s" for b in args.batches),
                       "verify5_ms", "five_steps_ms", "memory_mb", "memory_vs_file", "kv_mb_per_session_4k", "gpu_weights_mb", "gpu_peak_mb",
                       *(["b1_vs_" + ref["backend"]] if ref else [])])
    for r in rows:
        for p in r.get("profile", []):
            print(f"\n{r['backend']}: decode of {p['batch']} under the profiler, {p['ms_per_step']:.2f} ms/step, "
                  f"{p['aten_ops_per_step']:.0f} aten ops/step")
            print_table(p["top"], ["op", "calls_per_step", "self_ms_per_step", "share"])
    print("wrote", write_json(args.name, {"model": str(path), "file_mb": file_mb, "prompt_tokens": PROMPT_TOKENS, "device": args.device,
                                          "new_tokens": args.new_tokens, "results": rows}))


if __name__ == "__main__":
    main()
