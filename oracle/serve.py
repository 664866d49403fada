"""``shard-oracle serve``: the Oracle's process, assembled in one place.

weights → the blocks' pipeline (all local, or the swarm: trust → control plane → connections and
runner) → engine → scheduler → HTTP app. Every collaborator is passed to the constructor of what
uses it; nothing is attached afterwards. The event loop runs in its own thread; the main thread
runs the engine's tensor work (shard_common/main_thread.py) and receives the stop signals.
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
from concurrent.futures import Executor
from pathlib import Path

import torch
from aiohttp import web

from oracle.api import storage
from oracle.api.app import create_app
from oracle.api.schemas import RequestLimits
from oracle.api.server import run_site
from oracle.api.state import OracleState
from oracle.engine.engine import Engine
from oracle.engine.grammar import GrammarCompiler
from oracle.engine.pipeline import LocalPipeline
from oracle.engine.scheduler import Scheduler
from oracle.store.redis_server import EmbeddedRedis, async_client
from oracle.swarm.connection import ScoutAddress
from oracle.swarm.control import ModelOffer, OracleControl
from oracle.swarm.dial_in import DialInListener
from oracle.swarm.local_hop import LocalHop
from oracle.swarm.local_scouts import LocalScouts
from oracle.swarm.swarm import Swarm
from oracle.trust.health import HealthPolicy, PeerHealth
from oracle.trust.audit_policy import AuditPolicy
from oracle.trust.reference import ReferenceModel
from oracle.trust.reputation import ReputationStore, TrustPolicy
from oracle.trust.tickets import Auditor, TicketPolicy
from oracle.trust.traffic import TrafficAudit
from oracle.trust.verdicts import Verdicts
from shard_common.identity import Identity
from shard_common.main_thread import MainThreadExecutor, run_servers
from shard_common.model import shards
from shard_common.model.ends import ModelEnds
from shard_common.model.loader import load_weights, resolve_model_path
from shard_common.model.runtime import Runtime
from shard_common.model.span import Span
from shard_common.model.weights import ModelWeights
from shard_common import link_sim
from shard_common.p2p.node import P2PConfig, quiet_libp2p_logs
from shard_common.tokenizer import Tokenizer

log = logging.getLogger("oracle")

# Until real prompts have passed through, golden tickets are made of these.
TICKET_PROMPTS = ["What is the capital of France?", "Write a haiku about autumn leaves.",
                  "Explain how a bicycle stays upright.", "List three uses of copper."]


def directory_digest(folder: Path) -> str:
    """Content hash of a checkpoint folder (its safetensors and JSON files)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        h.update(f.name.encode() + bytes.fromhex(shards.sha256_file(f)))
    return h.hexdigest()


def wants_swarm(args: argparse.Namespace) -> bool:
    return bool(args.scouts.strip() or args.swarm or args.local_scouts or args.local_draft_scouts)


def uses_control_plane(args: argparse.Namespace) -> bool:
    return bool(args.swarm or args.local_scouts or args.local_draft_scouts)


def build_control(args: argparse.Namespace, identity: Identity, weights: ModelWeights, manifest: Path,
                  health: PeerHealth, listener: DialInListener) -> OracleControl:
    """The libp2p control plane (--swarm, --local-scouts): Scouts find this Oracle and get spans."""
    n_layers = weights.config.n_layers
    span_limit = args.blocks_per_scout
    if not span_limit and args.local_scouts:
        span_limit = math.ceil(n_layers / max(1, args.local_scouts // args.local_scout_replicas))
    public_url = (args.public_url or f"http://{args.host}:{args.port}").rstrip("/")
    block_bytes = max((manifest.parent / f).stat().st_size for f in json.loads(manifest.read_text())["blocks"])
    offer = ModelOffer(shards.set_id(manifest), weights.name, n_layers, block_bytes, public_url + "/shards",
                       weights.tokenizer.vocab_digest())
    bootstrap = [b.strip() for b in args.bootstrap.split(",") if b.strip()]
    allow = {p.strip() for p in args.allow_peers.split(",") if p.strip()} or None
    return OracleControl(identity, P2PConfig(args.p2p_host or args.host, args.p2p_port, bootstrap, args.mdns), offer,
                         span_limit, dead_after_seconds=args.dead_after, swarm_secret=args.swarm_secret, allow_peers=allow,
                         refuse_peer=health.refusal, data_port=lambda: listener.port)


def build_swarm(args: argparse.Namespace, weights: ModelWeights, tokenizer: Tokenizer, manifest: Path, executor: Executor,
                loop: asyncio.AbstractEventLoop, redis_url: str, own_scouts: set[str], runtime: Runtime) -> Swarm:
    """Trust first (the one owner of every Scout's health, and the auditors that judge Scouts),
    then the control plane and the swarm that uses both. ``own_scouts``: the peer ids of the
    Scouts this process starts itself (--local-scouts), which are not audited. ``runtime``: where
    the Oracle's own math runs (the audits' reference, its fallback blocks)."""
    identity = Identity.load_or_create(Path(args.data_dir) / "identity.key")
    reputation = ReputationStore(async_client(redis_url), args.redis_prefix, TrustPolicy(
        window=args.trust_window, quarantine_failures=args.quarantine_failures, ban_failures=args.ban_failures,
        ban_seconds=args.ban_seconds))
    auditing = not args.no_audits
    health = PeerHealth(reputation, HealthPolicy(probation=args.audit_probation if auditing else 0), own=own_scouts)
    auditor = traffic = None
    if auditing:
        reference = ReferenceModel(weights, runtime)
        verdicts = Verdicts(health, args.ticket_tolerance)
        if args.ticket_rate > 0:
            ends = ModelEnds(weights, runtime)
            prompts = [ends.embed(tokenizer.encode_chat([{"role": "user", "content": q}])) for q in TICKET_PROMPTS]
            auditor = Auditor(reference, executor, verdicts, args.wire_dtype,
                              TicketPolicy(rate=args.ticket_rate, idle_seconds=args.ticket_idle_seconds), prompts)
        traffic = TrafficAudit(reference, verdicts, args.wire_dtype, AuditPolicy(
            probation=args.audit_probation, floor=args.audit_floor, budget=args.audit_budget, reprobation=args.audit_reprobation))
    fill = None
    if args.fallback_local:
        budget = int(args.kv_budget_gb * (1 << 30))

        def fill(start: int, end: int) -> LocalHop:
            return LocalHop(Span(weights, start, end, runtime, kv_budget_bytes=budget))
    scouts = [ScoutAddress.parse(a.strip()) for a in args.scouts.split(",") if a.strip()]
    control = listener = None
    if uses_control_plane(args):
        listener = DialInListener(identity, Path(args.data_dir) / "tls", args.data_host or args.p2p_host or args.host,
                                  args.data_port, health, args.hop_timeout)
        control = build_control(args, identity, weights, manifest, health, listener)
    return Swarm(identity, weights.config.n_layers, loop, health, scouts, control, args.wire_dtype, fill, tokenizer.vocab_size,
                 weights.tokenizer.vocab_digest(), args.draft_deadline, args.hop_timeout, auditor, traffic,
                 piggyback=not args.eager_cache_ops, chain=not args.no_chain, listener=listener, pipeline_depth=local_pipeline_depth(args))


def local_pipeline_depth(args: argparse.Namespace) -> int:
    """``--pipeline-depth``, where a swarm of local Scouts alone sets it: they and the Oracle share
    this machine's cores, so one micro-batch per Scout keeps the cores busy and one more would only
    make three processes take turns on them (bench/pipeline.py: depth 2 beat 3 with 2 Scouts on
    2 cores). 0: the pipeline's own rule, one per Scout on a route and one for the Oracle."""
    if args.pipeline_depth or not args.local_scouts or args.swarm or args.scouts.strip():
        return args.pipeline_depth
    return args.local_scouts


def serve(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    quiet_libp2p_logs(logging.getLogger().level)
    link_sim.configure_from(args)
    embedded = None
    redis_url = args.redis_url
    if not redis_url:
        embedded = EmbeddedRedis(Path(args.data_dir) / "redis").start()
        redis_url = embedded.url
    local_scouts: LocalScouts | None = None
    try:
        t0 = time.monotonic()
        weights = load_weights(args.model, quantize=args.quantize)
        runtime = Runtime.pick(args.backend, args.device, args.kernels)
        tokenizer = Tokenizer(weights.tokenizer)
        manifest = shards.convert(weights, shards.sha256_file(path) if path.is_file() else directory_digest(path),
                                  Path(args.data_dir) / "shards")
        loop = asyncio.new_event_loop()
        executor = MainThreadExecutor()
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.local_scouts or args.local_draft_scouts:
            # The Scouts share this machine's cores between them: measured here, 1 thread per Scout
            # beat 2 each by 1.25x at one stream on 2 cores.
            threads = max(1, (os.cpu_count() or 1) // max(1, args.local_scouts))
            extra = ["--backend", args.backend, "--kernels", args.kernels, "--threads", str(threads), "--shards", str(manifest)]
            if args.local_scouts and not args.threads and local_pipeline_depth(args) != 1:
                # Pipelined, the Oracle's own math runs while its Scouts compute: it gets the cores
                # they leave, at least one (2 threads here contended with 2 one-thread Scouts on 2
                # cores: bench/pipeline.py measured 1 thread 1.1x faster).
                torch.set_num_threads(max(1, (os.cpu_count() or 1) - threads * args.local_scouts))
            if args.swarm_secret:  # handed down in the environment, not on a command line others can read
                os.environ["SHARD_SWARM_SECRET"] = args.swarm_secret
            local_scouts = LocalScouts(args.local_scouts, args.local_draft_scouts, Path(args.data_dir) / "local-scouts", extra)
        swarm = build_swarm(args, weights, tokenizer, manifest, executor, loop, redis_url,
                            local_scouts.peer_ids if local_scouts else set(), runtime) if wants_swarm(args) else None
        if swarm is not None:
            pipeline, drafters = swarm.pipeline, {"scout": swarm.drafter}
        else:
            budget = int(args.kv_budget_gb * (1 << 30))
            pipeline, drafters = LocalPipeline(Span(weights, 0, weights.config.n_layers, runtime, kv_budget_bytes=budget)), {}
        engine = Engine(ModelEnds(weights, runtime), pipeline, tokenizer, speculative=args.speculative, drafters=drafters)
        log.info("model %s ready in %.1fs (%s, %s on %s, %s kernels)", weights.name, time.monotonic() - t0, args.backend,
                 runtime.dtype, runtime.device, runtime.kernels)
        name = args.served_model_name or path.stem
        aliases = [a.strip() for a in args.model_aliases.split(",") if a.strip()]
        state = OracleState(
            tokenizer=tokenizer,
            scheduler=Scheduler(engine, max_running=args.max_running, max_queued=args.max_queued, executor=executor),
            model_ids=[name, *aliases],
            context_length=engine.context_length,
            n_layers=weights.config.n_layers,
            created=int(time.time()),
            fingerprint="fp_" + hashlib.sha256(f"{name}:{args.backend}:{runtime.kernels}".encode()).hexdigest()[:10],
            grammars=GrammarCompiler(tokenizer),
            limits=RequestLimits(max_n=args.max_n),
            embedding_pooling=args.embedding_pooling,
            swarm=swarm,
        )
        app = create_app(state, max_body_bytes=int(args.max_body_mb * (1 << 20)), shard_dir=manifest.parent,
                         public_metrics=args.public_metrics)

        marker: list[storage.TaintMarker] = []

        async def connect_storage(_: web.Application) -> None:
            await storage.connect(state, args, redis_url)
            if swarm is not None and swarm.taint is not None and state.completions is not None:
                marker.append(storage.TaintMarker(swarm.taint, state.completions, state.responses))
                marker[0].start()

        async def close_storage(_: web.Application) -> None:
            for m in marker:
                await m.close()
            for store in (state.completions, state.responses):
                if store is not None:
                    await store.close()

        app.on_startup.append(connect_storage)
        app.on_cleanup.append(close_storage)
        async def start_scouts() -> None:
            """Local Scouts start once the HTTP port is bound (a Scout could take it otherwise)."""
            if local_scouts is not None:
                await local_scouts.start(swarm.control.node.addrs[0])

        async def main(stop: asyncio.Event, ready: threading.Event) -> None:
            if swarm is not None:
                await swarm.connect()
            try:
                await run_site(app, args.host, args.port, stop, ready, start_scouts)
            finally:
                if swarm is not None:  # first: Scouts going away now are not news to act on
                    await swarm.close()
                if local_scouts is not None:
                    await local_scouts.stop()

        log.warning("serving model %s as %s", path, ", ".join(state.model_ids))
        return run_servers(main, executor, "oracle", loop)
    finally:
        if embedded is not None:
            embedded.stop()
