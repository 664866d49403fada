"""Start the HTTP server around a local engine."""

from __future__ import annotations

import argparse
import hashlib
import logging
import time

from aiohttp import web

from oracle.engine.local import build_local_model
from oracle.engine.scheduler import Scheduler
from shard_common.model.loader import resolve_model_path

from .app import create_app
from .generation import Limits
from .state import OracleState

log = logging.getLogger("oracle")


def serve(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    local = build_local_model(args.model, args.backend, args.kv_budget_gb, args.quantize)
    name = args.served_model_name or path.stem
    aliases = [a.strip() for a in args.model_aliases.split(",") if a.strip()]
    fingerprint = "fp_" + hashlib.sha256(f"{name}:{args.backend}".encode()).hexdigest()[:10]
    state = OracleState(
        tokenizer=local.tokenizer,
        scheduler=Scheduler(local.engine, max_running=args.max_running, max_queued=args.max_queued),
        model_ids=[name, *aliases],
        context_length=local.engine.context_length,
        created=int(time.time()),
        fingerprint=fingerprint,
        limits=Limits(max_n=args.max_n),
    )
    app = create_app(state, max_body_bytes=int(args.max_body_mb * (1 << 20)))
    log.warning("serving %s on http://%s:%d (OpenAI base URL http://%s:%d/v1)", name, args.host, args.port, args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=None, shutdown_timeout=15)
    return 0
