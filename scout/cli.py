"""``shard-scout``: a volunteer node serving a span of blocks on the data plane.

Today a Scout is told its span (``--span START:END``) and the Oracle is told where the Scouts
are (``shard-oracle serve --scout PEER_ID@HOST:PORT``). Discovery over libp2p, where the Oracle
assigns spans, is not built yet (see docs/status.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from pathlib import Path

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
    add_option(p, "--span", default=None, type=parse_span, help="blocks [START, END) to serve, e.g. 0:15", required=False)
    add_option(p, "--oracle-url", default=None, help="download the span's shard files from this Oracle (http://host:port)")
    add_option(p, "--shards", default=None, help="a shard set's manifest.json on this machine (what --local-scouts uses)")
    add_option(p, "--model", default=None, help="load the span from this GGUF/HF model instead (the bundled one when "
                                                 "neither --oracle-url nor --shards is given)")
    add_option(p, "--backend", default="quant", choices=["quant", "dense"], help="quant: 4/8-bit kernels (fast); dense: fp32")
    add_option(p, "--host", default="127.0.0.1", help="address the data plane listens on")
    add_option(p, "--data-port", default=0, type=int, help="data-plane TCP port (0: any free port)")
    add_option(p, "--data-dir", default=str(Path.home() / ".shard" / "scout"), help="identity key and TLS files")
    add_option(p, "--memory-gb", default=2.0, type=float, help="memory budget for KV caches")
    add_option(p, "--threads", default=0, type=int, help="torch threads for the span's math (0: torch's default, one per core)")
    add_option(p, "--allow-oracles", default="", help="comma-separated peer ids allowed to connect (empty: any)")
    add_option(p, "--log-level", default="info", help="debug, info, warning, error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.span is None:
        print("shard-scout: --span START:END is required (swarm discovery is not built yet; see docs/status.md)", file=sys.stderr)
        return 2
    from shard_common.identity import Identity
    from shard_common.main_thread import MainThreadExecutor, run_servers
    from shard_common.model import shards
    from shard_common.model.loader import load_weights
    from shard_common.model.runtime import Runtime
    from shard_common.model.span import Span

    from .server import SpanServer

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    identity = Identity.load_or_create(data_dir / "identity.key")
    start, end = args.span
    if args.oracle_url:
        manifest = shards.fetch(args.oracle_url.rstrip("/") + "/shards", data_dir / "shards", start, end)
        weights = shards.load(manifest, start, end)
    elif args.shards:
        weights = shards.load(Path(args.shards), start, end)
    else:
        weights = load_weights(args.model)
    span = Span(weights, start, end, Runtime.pick(args.backend), kv_budget_bytes=int(args.memory_gb * (1 << 30)))
    model_name = weights.name
    del weights
    executor = MainThreadExecutor()
    allowed = {p.strip() for p in args.allow_oracles.split(",") if p.strip()} or None
    server = SpanServer(span, identity, model_name, executor, data_dir / "tls", allowed)

    async def serve(stop: asyncio.Event, ready: threading.Event) -> None:
        await server.start(args.host, args.data_port)
        # One line a script can parse: how to reach this Scout.
        print(f"scout {identity.peer_id}@{args.host}:{server.port} span {start}:{end}", flush=True)
        ready.set()
        await stop.wait()
        server.server.close()
        await server.server.wait_closed()

    return run_servers(serve, executor, "scout")


if __name__ == "__main__":
    sys.exit(main())
