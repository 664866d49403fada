"""Start the HTTP server around a local engine.

The event loop runs in its own thread; the main thread runs the engine's steps (see
oracle/engine/main_thread.py) and receives the signals that start a graceful shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from concurrent.futures import Executor
from typing import Awaitable, Callable

from aiohttp import web

from oracle.engine.grammar import GrammarCompiler
from oracle.engine.local import build_local_model
from oracle.engine.scheduler import Scheduler
from oracle.store.redis_server import EmbeddedRedis
from oracle.swarm.control import ModelOffer, OracleControl
from oracle.swarm.local_scouts import LocalScout, start_local_scouts
from oracle.swarm.remote import LocalHop, ScoutAddress
from oracle.swarm.swarm import Swarm
from oracle.swarm.reference import ReferenceModel
from oracle.swarm.tickets import Auditor, TicketPolicy
from oracle.store.redis_server import async_client
from oracle.store.reputation import ReputationStore, TrustPolicy
from shard_common.identity import Identity
from shard_common.main_thread import MainThreadExecutor, run_servers
from shard_common.model import shards
from shard_common.model.loader import resolve_model_path
from shard_common.model.ends import ModelEnds
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span
from shard_common.model.weights import ModelWeights
from shard_common.p2p.node import P2PConfig, quiet_libp2p_logs
from shard_common.tokenizer import Tokenizer

from . import storage
from .app import create_app
from .generation import RequestLimits
from .state import OracleState

log = logging.getLogger("oracle")


async def run_site(app: web.Application, host: str, port: int, stop: asyncio.Event, ready: threading.Event,
                   after_start: Callable[[], Awaitable[None]] | None = None) -> None:
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=15)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.warning("listening on http://%s:%d (OpenAI base URL http://%s:%d/v1)", host, port, host, port)
        ready.set()
        if after_start is not None:
            await after_start()
        await stop.wait()
    finally:
        await runner.cleanup()


def directory_digest(folder: Path) -> str:
    """Content hash of a checkpoint folder (its safetensors and JSON files)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        h.update(f.name.encode() + bytes.fromhex(shards.sha256_file(f)))
    return h.hexdigest()


def build_swarm(args: argparse.Namespace, weights: ModelWeights, manifest: Path, executor: Executor) -> Swarm | None:
    """The Swarm pipeline when blocks run on Scouts (--swarm, --local-scouts or --scouts)."""
    scouts = [ScoutAddress.parse(a.strip()) for a in args.scouts.split(",") if a.strip()]
    if not (scouts or args.swarm or args.local_scouts or args.local_draft_scouts):
        return None
    identity = Identity.load_or_create(Path(args.data_dir) / "identity.key")
    n_layers = weights.config.n_layers
    control = None
    if args.swarm or args.local_scouts or args.local_draft_scouts:
        span_limit = args.blocks_per_scout
        if not span_limit and args.local_scouts:
            span_limit = math.ceil(n_layers / max(1, args.local_scouts // args.local_scout_replicas))
        public_url = (args.public_url or f"http://{args.host}:{args.port}").rstrip("/")
        block_bytes = max((manifest.parent / f).stat().st_size for f in json.loads(manifest.read_text())["blocks"])
        offer = ModelOffer(shards.set_id(manifest), weights.name, n_layers, block_bytes, public_url + "/shards",
                           weights.tokenizer.vocab_digest())
        bootstrap = [b.strip() for b in args.bootstrap.split(",") if b.strip()]
        allow = {p.strip() for p in args.allow_peers.split(",") if p.strip()} or None
        control = OracleControl(identity, P2PConfig(args.p2p_host or args.host, args.p2p_port, bootstrap, args.mdns), offer,
                                span_limit, dead_after_seconds=args.dead_after, swarm_secret=args.swarm_secret, allow_peers=allow)
    fill = None
    if args.fallback_local:
        runtime, budget = Runtime.pick(args.backend), int(args.kv_budget_gb * (1 << 30))

        def fill(start: int, end: int) -> LocalHop:
            return LocalHop(Span(weights, start, end, runtime, kv_budget_bytes=budget))
    tokenizer = Tokenizer(weights.tokenizer)
    swarm = Swarm(identity, n_layers, scouts, control, args.wire_dtype, fill, tokenizer.vocab_size,
                  weights.tokenizer.vocab_digest(), args.draft_deadline, args.hop_timeout)
    if args.ticket_rate > 0:
        policy = TicketPolicy(rate=args.ticket_rate, probation=args.ticket_probation, idle_seconds=args.ticket_idle_seconds,
                              tolerance=args.ticket_tolerance)
        ends = ModelEnds(weights, Runtime.pick(args.backend))
        prompts = [ends.embed(tokenizer.encode_chat([{"role": "user", "content": q}])) for q in TICKET_PROMPTS]
        reference = ReferenceModel(weights, Runtime.pick(args.backend))
        swarm.audit = lambda scouts, on_state: Auditor(reference, executor, swarm.reputation, args.wire_dtype, scouts,
                                                       on_state, policy, prompts)
    return swarm


# Until real prompts have passed through, golden tickets are made of these.
TICKET_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
                  "Explain how a bicycle stays upright.", "List three uses of copper."]


def serve(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    quiet_libp2p_logs(logging.getLogger().level)
    executor = MainThreadExecutor()
    made: dict[str, object] = {}

    def pipeline_for(weights: ModelWeights) -> Swarm | None:
        made["manifest"] = shards.convert(weights, shards.sha256_file(path) if path.is_file() else directory_digest(path),
                                          Path(args.data_dir) / "shards")
        made["swarm"] = build_swarm(args, weights, made["manifest"], executor)
        return made["swarm"]

    local = build_local_model(args.model, args.backend, args.kv_budget_gb, args.quantize, pipeline_for, args.speculative)
    manifest, swarm = made["manifest"], made["swarm"]
    local_scouts: list[LocalScout] = []
    name = args.served_model_name or path.stem
    aliases = [a.strip() for a in args.model_aliases.split(",") if a.strip()]
    fingerprint = "fp_" + hashlib.sha256(f"{name}:{args.backend}".encode()).hexdigest()[:10]
    state = OracleState(
        tokenizer=local.tokenizer,
        scheduler=Scheduler(local.engine, max_running=args.max_running, max_queued=args.max_queued, executor=executor),
        model_ids=[name, *aliases],
        context_length=local.engine.context_length,
        n_layers=local.weights.config.n_layers,
        created=int(time.time()),
        fingerprint=fingerprint,
        grammars=GrammarCompiler(local.tokenizer),
        limits=RequestLimits(max_n=args.max_n),
        embedding_pooling=args.embedding_pooling,
        swarm=swarm,
    )
    app = create_app(state, max_body_bytes=int(args.max_body_mb * (1 << 20)), shard_dir=manifest.parent,
                     public_metrics=args.public_metrics)
    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(Path(args.data_dir) / "redis").start()
        redis_url = embedded.url

    async def connect_storage(_: web.Application) -> None:
        await storage.connect(state, args, redis_url)

    async def close_storage(_: web.Application) -> None:
        for store in (state.completions, state.responses):
            if store is not None:
                await store.close()

    app.on_startup.append(connect_storage)
    app.on_cleanup.append(close_storage)

    async def start_scouts() -> None:
        """Local Scouts start once the HTTP port is bound (a Scout could take it otherwise)."""
        if args.local_scouts or args.local_draft_scouts:
            # Hops run one after another, so the Scouts share this machine's cores between them:
            # measured here, 1 thread per Scout beat 2 each by 1.25x at one stream on 2 cores.
            threads = max(1, (os.cpu_count() or 1) // max(1, args.local_scouts))
            extra = ["--backend", args.backend, "--threads", str(threads), "--shards", str(manifest),
                     "--bootstrap", swarm.control.node.addrs[0]]
            if args.swarm_secret:  # handed down in the environment, not on a command line others can read
                os.environ["SHARD_SWARM_SECRET"] = args.swarm_secret
            local_scouts.extend(await asyncio.to_thread(
                start_local_scouts, args.local_scouts, Path(args.data_dir) / "local-scouts", extra,
                args.local_draft_scouts))

    async def main(stop: asyncio.Event, ready: threading.Event) -> None:
        if swarm is not None:
            swarm.reputation = ReputationStore(async_client(redis_url), args.redis_prefix, TrustPolicy(
                window=args.trust_window, quarantine_failures=args.quarantine_failures, ban_failures=args.ban_failures,
                ban_seconds=args.ban_seconds))
            await swarm.connect()
            local.engine.drafters["scout"] = swarm.drafter
        try:
            await run_site(app, args.host, args.port, stop, ready, start_scouts)
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
