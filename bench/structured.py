"""Grammar-constrained decoding vs free generation, side by side in one run: decode tokens/s with a
JSON schema and without, at 1 and 16 streams, and what the mask costs per token on its own.

The schema (a long list of bounded strings) never completes before max_tokens, and free
generation ignores EOS, so both modes produce exactly the same number of tokens. The mask is
computed on a helper thread while the forward pass runs; the goal is >= 0.9x free generation.

    python bench/structured.py [--tokens 96] [--streams 1 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import print_table, write_json  # noqa: E402

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "minItems": 500,
                                                      "items": {"type": "string", "maxLength": 40}}},
          "required": ["items"], "additionalProperties": False}
PROMPT = "List many fruits and vegetables as JSON."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96, help="tokens generated per stream")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="runs per cell; the best is kept")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from oracle.engine.grammar import Constraint, GrammarCompiler
    from oracle.engine.local import build_local_model
    from oracle.engine.sampler import SamplingParams
    from oracle.engine.sequence import Sequence

    local = build_local_model(None, speculative="off")
    engine, tokenizer = local.engine, local.tokenizer
    compiler = GrammarCompiler(tokenizer)
    t = time.perf_counter()
    grammar = compiler.compile(Constraint.json_schema(SCHEMA))
    compile_ms = (time.perf_counter() - t) * 1e3
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])

    def run(streams: int, constrained: bool) -> tuple[float, list[Sequence]]:
        seqs = [Sequence(prompt, SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=not constrained,
                                                grammar=grammar if constrained else None), tokenizer, engine.context_length)
                for _ in range(streams)]
        # Prefill first, outside the clock: this measures decode.
        while any(s.pending > 1 for s in seqs):
            engine.step([s for s in seqs if s.pending > 1])
        start = time.perf_counter()
        for _ in engine.generate(seqs):
            pass
        return time.perf_counter() - start, seqs

    rows = []
    for streams in args.streams:
        cell = {}
        for constrained in (False, True):
            best, seqs = min((run(streams, constrained) for _ in range(args.repeat)), key=lambda r: r[0])
            tokens = sum(len(s.output) for s in seqs) - len(seqs)  # the first token of each came from prefill
            cell[constrained] = tokens / best
            if constrained:
                assert all(s.finish_reason == "length" for s in seqs), "the schema completed early: raise minItems"
        rows.append({"streams": streams, "free_tok_s": cell[False], "schema_tok_s": cell[True], "ratio": cell[True] / cell[False]})

    # The mask alone, per token, on the tokens a constrained run produced.
    _, seqs = run(1, True)
    matcher = grammar.matcher()
    costs = []
    for choice in seqs[0].output:
        t = time.perf_counter()
        matcher.masks([])
        costs.append(time.perf_counter() - t)
        matcher.consume(choice.token)
    mask_us = statistics.median(costs) * 1e6

    print_table(rows, ["streams", "free_tok_s", "schema_tok_s", "ratio"])
    print(f"mask per token (median, alone): {mask_us:.0f} us; schema compile: {compile_ms:.0f} ms")
    print("wrote", write_json("structured", {"tokens_per_stream": args.tokens, "threads": args.threads, "rows": rows,
                                             "mask_us_median": mask_us, "compile_ms": compile_ms}))


if __name__ == "__main__":
    main()
