"""``shard-scout``: a volunteer node serving a span of transformer blocks for an Oracle.

Join a swarm:  shard-scout --bootstrap /ip4/HOST/tcp/PORT/p2p/ORACLE_PEER_ID
  The Scout announces itself over libp2p, the Oracle assigns it a span, and the Scout downloads
  those blocks from the Oracle (sha256-checked, cached under --data-dir) and serves them on its
  data plane. It follows reassignments and finds the Oracle again after the Oracle restarts.
  A Scout that knows any swarm member (another Scout) finds the Oracle through the DHT.

Serve a fixed span without libp2p:  shard-scout --span 0:15 [--oracle-url URL | --shards PATH]
  and give the Oracle its address: shard-oracle serve --scouts PEER_ID@HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
from pathlib import Path

from shard_common.link_sim import add_link_options, configure_from
from shard_common.settings import add_option, setup_logging

log = logging.getLogger("scout")


def parse_span(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError("a span looks like START:END, e.g. 0:15") from None
    return start, end


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shard-scout", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_option(p, "--bootstrap", default="", help="comma-separated multiaddrs of swarm members to join through "
                                                   "(the Oracle prints its own at start; without it, --oracle-url's /swarm tells)")
    add_option(p, "--mdns", action="store_true", default=False, help="also find swarm members on the LAN with mDNS")
    add_option(p, "--p2p-port", default=0, type=int, help="libp2p TCP port (0: any free port)")
    add_option(p, "--role", default="span", choices=["span", "draft"],
               help="span: serve blocks the Oracle assigns; draft: run a whole small model with the target's vocabulary "
                    "and propose tokens for speculative decoding")
    add_option(p, "--draft-model", default=None, help="with --role draft: the GGUF/HF model to draft with (default: the "
                                                       "Oracle's own model, downloaded whole)")
    add_option(p, "--span", default=None, type=parse_span, help="serve blocks [START, END) from the start instead of waiting "
                                                                "for the Oracle to assign a span, e.g. 0:15")
    add_option(p, "--oracle-url", default=None, help="download shard files from this Oracle (http://host:port) instead of "
                                                     "the URL the Oracle announces")
    add_option(p, "--shards", default=None, help="a shard set's manifest.json on this machine (what --local-scouts uses)")
    add_option(p, "--model", default=None, help="with --span and no shards: load the span from this GGUF/HF model "
                                                 "(the bundled one when unset)")
    add_option(p, "--backend", default="quant", choices=["quant", "dense"], help="quant: 4/8-bit kernels (fast); dense: fp32")
    add_option(p, "--quantize", default=None, choices=["q8_0", "q4_0", "q4_1"],
               help="with --span and --model: quantize a Hugging Face checkpoint at load time, as the Oracle does")
    add_option(p, "--device", default="auto", help="cpu, cuda (cuda:N) or auto: CUDA when torch sees a GPU (int4 kernels need "
               "compute capability 8.0; older GPUs run dense bf16)")
    add_option(p, "--kernels", default="auto", choices=["auto", "native", "eager"],
               help="the operations between a block's matmuls on CPU: native = compiled once on this machine (needs a "
                    "C++ compiler; ~1.5x faster decode), eager = torch ops; auto = native where it builds")
    add_option(p, "--host", default="127.0.0.1", help="address the data plane and libp2p listen on")
    add_option(p, "--announce-host", default=None, help="data-plane address to announce (default: --host, or this machine's address when --host is 0.0.0.0)")
    add_option(p, "--data-port", default=0, type=int, help="data-plane TCP port (0: any free port)")
    add_option(p, "--no-listen", action="store_true", default=False,
               help="behind NAT: open no data-plane port; dial the Oracle's data plane instead (it announces where)")
    add_option(p, "--data-dir", default=str(Path.home() / ".shard" / "scout"), help="identity key, TLS files, shard cache")
    add_option(p, "--memory-gb", default=2.0, type=float, help="memory for weights and KV caches; the Oracle sizes the span by it")
    add_option(p, "--threads", default=0, type=int, help="torch threads for the span's math (0: torch's default, one per core)")
    add_option(p, "--allow-oracles", default="", help="comma-separated peer ids allowed to connect and assign spans (empty: any)")
    add_option(p, "--session-idle-seconds", default=600.0, type=float, help="free a session's KV cache after this long unused")
    add_option(p, "--simulate-latency-ms", default=0.0, type=float,
               help="for benchmarks only: delay every data-plane reply, as over a slow link (one round trip per hop)")
    add_link_options(p)
    add_option(p, "--swarm-secret", default=None, help="private swarm: the shared secret the Oracle requires (prove it, and "
                                                        "follow only Oracles that prove it)")
    add_option(p, "--inject-faults", default="", help="TESTING ONLY: misbehave on purpose to test a swarm's defences, e.g. "
               "corrupt=0.2 | noise=0.1 | skip=1 | delay_ms=200 | hang=1 | draft=random (see scout/faults.py)")
    add_option(p, "--heartbeat", default=1.0, type=float, help="seconds between announcements")
    add_option(p, "--log-level", default="info", help="debug, info, warning, error")
    add_option(p, "--log-format", default="text", choices=["text", "json"], help="json: one object per line")
    return p


def measure_throughput(span, steps: int = 8) -> float:
    """Block-tokens per second of one-token decode steps on this span (what the Oracle weighs
    placement and routing by), after a short warm-up prompt."""
    import torch

    from shard_common.model.span import SpanRequest

    session, d = "~benchmark", span.config.d_model
    span.forward(torch.randn(16, d) * 0.1, [SpanRequest(session, 0, 16)])
    started = time.perf_counter()
    for i in range(steps):
        span.forward(torch.randn(1, d) * 0.1, [SpanRequest(session, 16 + i, 1)])
    elapsed = time.perf_counter() - started
    span.free(session)
    return round(steps * (span.end - span.start) / elapsed, 1)


def bootstrap_from_oracle(url: str, attempts: int = 60) -> list[str]:
    """The Oracle's libp2p addresses from its public ``/swarm``, with a wildcard listen address
    replaced by the host the URL names (retried while the Oracle starts)."""
    import ipaddress
    import socket
    import urllib.parse
    import urllib.request

    host = urllib.parse.urlparse(url).hostname or "127.0.0.1"
    try:
        ip = str(ipaddress.ip_address(host))
    except ValueError:
        ip = socket.gethostbyname(host)
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/swarm", timeout=5) as r:
                info = json.loads(r.read())
            return [a.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/") for a in info["multiaddrs"]]
        except OSError as e:
            if attempt == attempts - 1:
                raise RuntimeError(f"cannot learn the Oracle's libp2p address from {url}/swarm: {e}") from e
            time.sleep(2)
    return []


def default_announce_host(host: str) -> str:
    """Listening on every interface: announce this machine's own address (a container's, say)."""
    import socket

    if host not in ("0.0.0.0", "::"):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    bootstrap = [b.strip() for b in args.bootstrap.split(",") if b.strip()]
    if not bootstrap and args.oracle_url and args.span is None:
        bootstrap = bootstrap_from_oracle(args.oracle_url)
    if args.span is None and not bootstrap and not args.mdns and args.role == "span":
        print("shard-scout: give --bootstrap MULTIADDR, --oracle-url URL or --mdns to join a swarm, or --span START:END "
              "to serve a fixed span", file=sys.stderr)
        return 2
    if args.no_listen and not (bootstrap or args.mdns):
        print("shard-scout: --no-listen needs the control plane (--bootstrap, --oracle-url or --mdns) to learn where to dial",
              file=sys.stderr)
        return 2
    import torch

    from shard_common.identity import Identity
    from shard_common.main_thread import MainThreadExecutor, run_servers
    from shard_common.model import shards
    from shard_common.model.loader import load_weights
    from shard_common.model.runtime import Runtime
    from shard_common.model.span import Span
    from shard_common.p2p.announcements import Capabilities
    from shard_common.p2p.node import P2PConfig, quiet_libp2p_logs

    from .control import ScoutControl
    from .dialer import OracleDialer
    from .draft_model import DraftModel
    from .faults import FaultInjector
    from .server import SpanServer

    quiet_libp2p_logs(logging.getLogger().level)
    configure_from(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    identity = Identity.load_or_create(data_dir / "identity.key")
    runtime = Runtime.pick(args.backend, args.device, args.kernels)
    kv_budget = int(args.memory_gb * (1 << 30))
    if runtime.device.type == "cuda":  # placement sizes spans by memory: on a GPU, what the GPU has free
        kv_budget = min(kv_budget, torch.cuda.mem_get_info(runtime.device)[0])
    capabilities = Capabilities(device=str(runtime.device), threads=torch.get_num_threads(), memory_bytes=kv_budget)

    def manifest_for(shards_url: str | None, start: int, end: int, model: str | None = None, with_ends: bool = False) -> Path:
        if args.shards and (model is None or shards.set_id(args.shards) == model):
            return Path(args.shards)
        url = args.oracle_url or shards_url
        if url is None:
            raise RuntimeError("no shard source: give --oracle-url or --shards")
        return shards.fetch(url.rstrip("/") + ("" if url.rstrip("/").endswith("/shards") else "/shards"),
                            data_dir / "shards", start, end, with_ends=with_ends)

    def build_span(weights, start: int, end: int) -> Span:
        span = Span(weights, start, end, runtime, kv_budget_bytes=kv_budget)
        capabilities.throughput = measure_throughput(span)
        return span

    def load_assigned(oracle, start: int, end: int) -> Span:
        return build_span(shards.load(manifest_for(oracle.shards_url, start, end, oracle.model), start, end), start, end)

    def load_draft_model(oracle) -> DraftModel:
        if args.draft_model:
            weights = load_weights(args.draft_model)
        else:
            n_layers = oracle.n_layers if oracle else json.loads(Path(args.shards).read_text())["config"]["n_layers"]
            manifest = manifest_for(oracle.shards_url if oracle else None, 0, n_layers, oracle.model if oracle else None,
                                    with_ends=True)
            weights = shards.load(manifest, 0, n_layers, with_ends=True)
        return DraftModel(weights, runtime, kv_budget)

    span, model_name, model_id = None, "", None
    draft = None
    if args.role == "draft" and (args.draft_model or args.shards):
        draft = load_draft_model(None)
        model_id = shards.set_id(args.shards) if args.shards and not args.draft_model else None
    if args.span is not None and draft is None:
        start, end = args.span
        if args.oracle_url or args.shards:
            manifest = manifest_for(None, start, end)
            weights = shards.load(manifest, start, end)
            model_id = shards.set_id(manifest)
        else:
            weights = load_weights(args.model, quantize=args.quantize)
        span, model_name = build_span(weights, start, end), weights.name
        del weights
    executor = MainThreadExecutor()
    allowed = {p.strip() for p in args.allow_oracles.split(",") if p.strip()} or None
    try:
        faults = FaultInjector(args.inject_faults)
    except ValueError as e:
        print(f"shard-scout: --inject-faults: {e}", file=sys.stderr)
        return 2
    if faults:
        log.warning("INJECTING FAULTS (%s): this Scout misbehaves on purpose", args.inject_faults)
    server = SpanServer(span, identity, model_name, executor, data_dir / "tls", allowed, args.session_idle_seconds,
                        args.simulate_latency_ms, faults)
    if draft is not None:
        server.set_draft_model(draft)
    control = None
    if bootstrap or args.mdns:
        control = ScoutControl(identity, P2PConfig(args.host, args.p2p_port, bootstrap, args.mdns), server, executor,
                               load_assigned, args.announce_host or default_announce_host(args.host), capabilities, model_id, allowed,
                               heartbeat_seconds=args.heartbeat, load_draft=load_draft_model if args.role == "draft" else None,
                               swarm_secret=args.swarm_secret, dialer=OracleDialer(server, identity))

    async def serve(stop: asyncio.Event, ready: threading.Event) -> None:
        await server.start(args.host, args.data_port, listen=not args.no_listen)
        addrs = await control.start() if control else []
        # One line a script can parse: how to reach this Scout.
        where = "drafting" if args.role == "draft" else f"span {span.start}:{span.end}" if span else "waiting for a span"
        print(f"scout {identity.peer_id}@{args.host}:{server.port} {where}", flush=True)
        for a in addrs:
            log.warning("libp2p: %s", a)
        ready.set()
        await stop.wait()
        if control:
            await control.stop()
        await server.close()

    return run_servers(serve, executor, "scout")


if __name__ == "__main__":
    sys.exit(main())
