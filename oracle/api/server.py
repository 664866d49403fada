"""Start the HTTP server around a local engine.

The event loop runs in its own thread; the main thread runs the engine's steps (see
oracle/engine/main_thread.py) and receives the signals that start a graceful shutdown.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import signal
import threading
import time
from pathlib import Path

from aiohttp import web

from oracle.engine.local import build_local_model
from oracle.engine.main_thread import MainThreadExecutor
from oracle.engine.scheduler import Scheduler
from shard_common.model.loader import resolve_model_path

from oracle.store.redis_server import EmbeddedRedis

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
        ready.set()
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(args: argparse.Namespace) -> int:
    path = resolve_model_path(args.model)
    local = build_local_model(args.model, args.backend, args.kv_budget_gb, args.quantize)
    name = args.served_model_name or path.stem
    aliases = [a.strip() for a in args.model_aliases.split(",") if a.strip()]
    fingerprint = "fp_" + hashlib.sha256(f"{name}:{args.backend}".encode()).hexdigest()[:10]
    executor = MainThreadExecutor()
    state = OracleState(
        tokenizer=local.tokenizer,
        scheduler=Scheduler(local.engine, max_running=args.max_running, max_queued=args.max_queued, executor=executor),
        model_ids=[name, *aliases],
        context_length=local.engine.context_length,
        created=int(time.time()),
        fingerprint=fingerprint,
        limits=RequestLimits(max_n=args.max_n),
    )
    app = create_app(state, max_body_bytes=int(args.max_body_mb * (1 << 20)))
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

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready, finished = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def loop_thread() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run_site(app, args.host, args.port, stop, ready))
        except BaseException as e:
            errors.append(e)
        finally:
            loop.close()
            finished.set()

    def request_stop(signum, _frame) -> None:
        log.warning("received %s: finishing in-flight requests, then stopping", signal.Signals(signum).name)
        loop.call_soon_threadsafe(stop.set)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    threading.Thread(target=loop_thread, name="event-loop", daemon=True).start()
    while not (ready.is_set() or finished.is_set()):
        time.sleep(0.05)
    if ready.is_set():
        log.warning("serving %s on http://%s:%d (OpenAI base URL http://%s:%d/v1)", name, args.host, args.port, args.host, args.port)
    executor.run_until(finished)
    if embedded is not None:
        embedded.stop()
    if errors:
        log.error("server stopped with an error: %s", errors[0])
        return 1
    return 0
