"""Run the aiohttp application until asked to stop."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Awaitable, Callable

from aiohttp import web

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
