"""Start the HTTP server around a local engine.

The event loop runs in its own thread; the main thread runs the engine's steps (see
oracle/engine/main_thread.py) and receives the signals that start a graceful shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from aiohttp import web

from oracle.engine.local import build_local_model
from oracle.engine.scheduler import Scheduler
from oracle.store.redis_server import EmbeddedRedis
from oracle.swarm.local_scouts import start_local_scouts
from oracle.swarm.remote import LocalHop, ScoutAddress
from oracle.swarm.static import StaticSwarm
from shard_common.identity import Identity
from shard_common.main_thread import MainThreadExecutor, run_servers
from shard_common.model import shards
from shard_common.model.loader import resolve_model_path
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span

from . import storage
from .app import create_app
from .generation import RequestLimits
from .state import OracleState

log = logging.getLogger("oracle")


async def run_site(app: web.Application, host: str, port: int, stop: asyncio.Event, ready: threading.Event) -> None:
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=15)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.warning("listening on http://%s:%d (OpenAI base URL http://%s:%d/v1)", host, port, host, port)
        ready.set()
        await stop.wait()
    finally:
        await runner.cleanup()


def directory_digest(folder: Path) -> str:
    """Content hash of a checkpoint folder (its safetensors and JSON files)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        h.update(f.name.encode() + bytes.fromhex(shards.sha256_file(f)))
    return h.hexdigest()


def serve(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    scouts = [ScoutAddress.parse(a.strip()) for a in args.scouts.split(",") if a.strip()]
    swarm = None
    if scouts or args.local_scouts:
        swarm = StaticSwarm(scouts, Identity.load_or_create(Path(args.data_dir) / "identity.key"), args.wire_dtype)
    local = build_local_model(args.model, args.backend, args.kv_budget_gb, args.quantize, pipeline=swarm)
    if swarm is not None and args.fallback_local:
        runtime, budget = Runtime.pick(args.backend), int(args.kv_budget_gb * (1 << 30))
        swarm.fill = lambda start, end: LocalHop(Span(local.weights, start, end, runtime, kv_budget_bytes=budget))
    manifest = shards.convert(local.weights, shards.sha256_file(path) if path.is_file() else directory_digest(path),
                              Path(args.data_dir) / "shards")
    local_scouts = []
    if args.local_scouts:
        # Hops run one after another, so the Scouts share this machine's cores between them:
        # measured here, 1 thread per Scout beat 2 each by 1.25x at one stream on 2 cores.
        threads = max(1, (os.cpu_count() or 1) // args.local_scouts)
        extra = ["--backend", args.backend, "--threads", str(threads), "--shards", str(manifest)]
        local_scouts = start_local_scouts(local.weights.config.n_layers, args.local_scouts, args.local_scout_replicas,
                                          Path(args.data_dir) / "local-scouts", extra)
        swarm.addresses += [s.address for s in local_scouts]
    name = args.served_model_name or path.stem
    aliases = [a.strip() for a in args.model_aliases.split(",") if a.strip()]
    fingerprint = "fp_" + hashlib.sha256(f"{name}:{args.backend}".encode()).hexdigest()[:10]
    executor = MainThreadExecutor()
    state = OracleState(
        tokenizer=local.tokenizer,
        scheduler=Scheduler(local.engine, max_running=args.max_running, max_queued=args.max_queued, executor=executor),
        model_ids=[name, *aliases],
        context_length=local.engine.context_length,
        n_layers=local.weights.config.n_layers,
        created=int(time.time()),
        fingerprint=fingerprint,
        limits=RequestLimits(max_n=args.max_n),
        swarm=swarm,
    )
    app = create_app(state, max_body_bytes=int(args.max_body_mb * (1 << 20)), shard_dir=manifest.parent)
    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(Path(args.data_dir) / "redis").start()
        redis_url = embedded.url

    async def connect_storage(_: web.Application) -> None:
        await storage.connect(state, args, redis_url)

    async def close_storage(_: web.Application) -> None:
        if state.completions is not None:
            await state.completions.close()

    app.on_startup.append(connect_storage)
    app.on_cleanup.append(close_storage)

    async def main(stop: asyncio.Event, ready: threading.Event) -> None:
        if swarm is not None:
            await swarm.connect(local.weights.config.n_layers)
        try:
            await run_site(app, args.host, args.port, stop, ready)
        finally:
            if swarm is not None:
                await swarm.close()

    log.warning("serving model %s as %s", path, ", ".join(state.model_ids))
    try:
        return run_servers(main, executor, "oracle")
    finally:
        if embedded is not None:
            embedded.stop()
        for scout in local_scouts:
            scout.stop()
