"""``shard-oracle``: serve the OpenAI-compatible API, or generate locally for a quick check."""

from __future__ import annotations

import argparse
import os
import sys

from oracle.api.storage import add_redis_options, add_storage_options
from oracle.swarm.addresses import DEFAULT_DATA_PORT
from shard_common.link_sim import add_link_options
from shard_common.settings import add_option, setup_logging


def add_model_options(p: argparse.ArgumentParser) -> None:
    add_option(p, "--model", default=None, help="GGUF file or Hugging Face folder; the bundled SmolLM2-135M when unset")
    add_option(p, "--backend", default="quant", choices=["quant", "dense"],
               help="quant: 4/8-bit kernels with bf16 activations (fast); dense: fp32 reference")
    add_option(p, "--device", default="cpu", help="cpu, cuda (cuda:N) or auto (CUDA when torch sees one): where this process's "
               "own blocks, golden tickets' reference and the model's ends run")
    add_option(p, "--quantize", default=None, choices=["q8_0", "q4_0", "q4_1"],
               help="quantize a Hugging Face checkpoint at load time")
    add_option(p, "--kernels", default="auto", choices=["auto", "native", "eager"],
               help="the operations between a block's matmuls on CPU: native = compiled once on this machine (needs a "
                    "C++ compiler; ~1.5x faster decode), eager = torch ops; auto = native where it builds")
    add_option(p, "--kv-budget-gb", default=2.0, type=float, help="memory for KV caches")
    add_option(p, "--speculative", default="auto", choices=["off", "ngram", "scout", "auto"],
               help="speculative decoding: ngram = prompt lookup; scout = a draft Scout (falls back to ngram); "
                    "auto = scout when one serves, else ngram; a request may override it with \"speculative\"")
    add_option(p, "--log-level", default="warning", help="debug, info, warning, error")
    add_option(p, "--log-format", default="text", choices=["text", "json"], help="json: one object per line, with request ids")


def cmd_generate(args: argparse.Namespace) -> int:
    from oracle.engine.local import build_local_model
    from oracle.engine.sampler import SamplingParams
    from oracle.engine.sequence import Sequence

    local = build_local_model(args.model, args.backend, args.kv_budget_gb, args.quantize, speculative=args.speculative,
                              device=args.device, kernels=args.kernels)
    tok = local.tokenizer
    ids = tok.encode(args.prompt) if args.raw else tok.encode_chat([{"role": "user", "content": args.prompt}])
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop=args.stop or []
    )
    seq = Sequence(ids, params, tok, local.engine.context_length)
    for _, event in local.engine.generate([seq]):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    spec = seq.spec.stats.as_dict()
    drafted = f", speculation: {spec['tokens_per_pass']} tokens per pass, {spec['acceptance_rate']:.0%} of drafts accepted" if spec["passes"] else ""
    print(f"[{len(seq.output)} tokens, finish_reason={seq.finish_reason}{drafted}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from oracle.serve import serve

    return serve(args)


def cmd_status(args: argparse.Namespace) -> int:
    from oracle.status_cli import run_status_command

    return run_status_command(args)


def cmd_keys(args: argparse.Namespace) -> int:
    from oracle.store.keys_cli import run_keys_command

    return run_keys_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shard-oracle",
        description="The Shard Oracle: an OpenAI-compatible API over a swarm of Scouts.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate locally from a prompt and stream it to the terminal")
    gen.add_argument("prompt", help="the user message (or raw text with --raw)")
    gen.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    add_model_options(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_option(serve, "--host", default="127.0.0.1", help="address to listen on")
    add_option(serve, "--port", default=8000, type=int, help="HTTP port")
    add_option(serve, "--served-model-name", default=None, help="model id in the API; the model file's name when unset")
    add_option(serve, "--model-aliases", default="", help="comma-separated extra ids for the same model")
    add_option(serve, "--max-running", default=32, type=int, help="sequences decoded together in one batch")
    add_option(serve, "--max-queued", default=256, type=int, help="requests waiting beyond that; more get 503")
    add_option(serve, "--max-n", default=16, type=int, help="largest n (or best_of x prompts) per request")
    add_option(serve, "--embedding-pooling", default="mean", choices=["mean", "last"],
               help="/v1/embeddings: average the final hidden states over the input's tokens, or take the last token's")
    add_option(serve, "--public-metrics", action="store_true", default=False,
               help="serve /metrics without a key (for a Prometheus on a private network); else it needs an admin key")
    add_option(serve, "--max-body-mb", default=4.0, type=float, help="largest accepted request body")
    add_option(serve, "--swarm", action="store_true", default=False,
               help="run the blocks on Scouts that join over libp2p (shard-scout --bootstrap <the multiaddr this prints>)")
    add_option(serve, "--p2p-port", default=7420, type=int, help="libp2p TCP port (fixed, so Scouts find a restarted Oracle)")
    add_option(serve, "--p2p-host", default=None, help="address libp2p listens on (default: --host)")
    add_option(serve, "--data-port", default=DEFAULT_DATA_PORT, type=int,
               help="TLS port Scouts behind NAT dial for the data plane (fixed, announced to Scouts; 0: any free port)")
    add_option(serve, "--data-host", default=None, help="address that port listens on (default: --p2p-host, else --host)")
    add_option(serve, "--bootstrap", default="", help="comma-separated multiaddrs of swarm members to join through")
    add_option(serve, "--mdns", action="store_true", default=False, help="also find Scouts on the LAN with mDNS")
    add_option(serve, "--public-url", default=None, help="this Oracle's URL as Scouts reach it, for shard downloads "
               "(default: http://HOST:PORT)")
    add_option(serve, "--blocks-per-scout", default=0, type=int,
               help="longest span a Scout is assigned (0: as many as its memory holds; with --local-scouts: an even split)")
    add_option(serve, "--dead-after", default=3.0, type=float, help="seconds without a heartbeat before a Scout counts as dead")
    add_option(serve, "--scouts", default="", help="comma-separated PEER_ID@HOST:PORT of Scouts started with --span "
               "(no libp2p needed); combined with --swarm, both are used")
    add_option(serve, "--local-scouts", default=0, type=int,
               help="start this many Scout processes on this machine; they join over libp2p and get spans like remote ones")
    add_option(serve, "--local-draft-scouts", default=0, type=int,
               help="start this many draft Scouts on this machine (the whole model, proposing tokens for --speculative scout/auto)")
    add_option(serve, "--hop-timeout", default=20.0, type=float,
               help="seconds a Scout may take to answer one request; past it the Scout counts as dead for that step, "
               "its sessions move to a replica, and it is left alone for 10 s (doubling while it keeps timing out)")
    add_option(serve, "--draft-deadline", default=2.0, type=float,
               help="seconds to wait for a draft Scout's proposal before using prompt lookup for that step")
    add_option(serve, "--swarm-secret", default=None, help="private swarm: Scouts must prove they know this secret to join")
    add_option(serve, "--allow-peers", default="", help="private swarm: comma-separated Scout peer ids allowed to join (empty: any)")
    add_option(serve, "--no-audits", action="store_true", default=False,
               help="never check Scouts (no golden tickets, no audits of real traffic): for benchmarks and swarms of "
                    "machines you own")
    add_option(serve, "--ticket-rate", default=0.03, type=float,
               help="fraction of a Scout's forwards followed by a golden ticket (0: none; quarantined Scouts then stay "
                    "quarantined, having no way to earn trust back)")
    add_option(serve, "--audit-probation", default=200, type=int,
               help="checked forwards a Scout must pass after it connects (and after a quarantine) before the Oracle only "
                    "samples its sessions; during them every session it starts is followed and checked before use")
    add_option(serve, "--audit-floor", default=0.02, type=float,
               help="least share of a trusted Scout's sessions the Oracle follows with its own blocks")
    add_option(serve, "--audit-budget", default=0.03, type=float,
               help="share of the Oracle's engine time that audits of real traffic may use above the floor")
    add_option(serve, "--audit-reprobation", default=0.0005, type=float,
               help="chance per forward that a trusted Scout is put back on probation (50 checked forwards)")
    add_option(serve, "--ticket-idle-seconds", default=60.0, type=float, help="an idle Scout gets a ticket this often")
    add_option(serve, "--ticket-tolerance", default=0.05, type=float,
               help="largest relative L2 error of a Scout's output that passes (honest Scouts measured 0 to 0.012; docs/trust.md)")
    add_option(serve, "--trust-window", default=20, type=int, help="tickets of a Scout's recent history that count")
    add_option(serve, "--quarantine-failures", default=1, type=int, help="failed tickets in the window that quarantine")
    add_option(serve, "--ban-failures", default=3, type=int, help="failed tickets in the window that ban")
    add_option(serve, "--ban-seconds", default=3600.0, type=float, help="how long a ban lasts")
    add_option(serve, "--local-scout-replicas", default=1, type=int,
               help="how many local Scouts serve each span (2: any one can die without a pause longer than a replay)")
    add_option(serve, "--fallback-local", action="store_true", default=False,
               help="compute the blocks no Scout serves (or whose Scouts all died) in this process instead of answering 503")
    add_link_options(serve)
    add_option(serve, "--threads", default=0, type=int,
               help="torch threads for the Oracle's own math: embedding, head, local blocks (0: one per core; with pipelined "
                    "--local-scouts, the cores they leave, at least one)")
    add_option(serve, "--pipeline-depth", default=0, type=int,
               help="micro-batches in flight through the Scouts at once, so each Scout computes one while the others "
                    "compute theirs (0: one more than the Scouts on a route, or with only --local-scouts one per Scout; 1: one batch at "
                    "a time, lockstep)")
    add_option(serve, "--no-chain", action="store_true", default=False,
               help="send every step through the Scouts hub-style (Oracle → Scout → Oracle per hop) instead of chaining "
                    "Scouts that can reach each other (Oracle → S1 → … → Sn → Oracle: n + 1 trips instead of 2n)")
    add_option(serve, "--eager-cache-ops", action="store_true", default=False,
               help="for benchmarks: send every KV cache rollback/fork/free to the Scouts at once, in a round trip of its "
                    "own, instead of on the hop's next forward")
    add_option(serve, "--wire-dtype", default="float32", choices=["float32", "bfloat16", "float16", "int8"],
               help="dtype of hidden states sent to Scouts (float32 keeps outputs identical to local runs)")
    add_model_options(serve)
    add_storage_options(serve)
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="print the swarm's picture: coverage, Scouts, load (needs an admin key)")
    add_option(status, "--url", default="http://127.0.0.1:8000", help="the Oracle's base URL")
    add_option(status, "--key", default=os.environ.get("SHARD_ADMIN_KEY"), help="an admin key (default: $SHARD_ADMIN_KEY)")
    status.add_argument("--log-level", default="warning")
    status.set_defaults(func=cmd_status)

    keys = sub.add_parser("keys", help="create, list and revoke API keys (in the Oracle's Redis)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="an admin key (unlimited unless --rpm/--tpm)")
    add_option(create, "--rpm", default=None, type=int, help="requests per minute (0: unlimited); users default to --default-rpm")
    add_option(create, "--tpm", default=None, type=int, help="tokens per minute (0: unlimited); users default to --default-tpm")
    add_option(create, "--default-rpm", default=60, type=int, help="RPM of user keys created without --rpm")
    add_option(create, "--default-tpm", default=200000, type=int, help="TPM of user keys created without --tpm")
    listing = keys_sub.add_parser("list", help="names, prefixes and limits (never the keys)")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by id, name or prefix")
    revoke.add_argument("key")
    for p in (create, listing, revoke):
        add_redis_options(p)
    keys.add_argument("--log-level", default="warning")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, getattr(args, "log_format", "text"))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
