"""Connect the HTTP layer to Redis at startup: keys, rate limits, stored completions."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from redis.exceptions import RedisError

from oracle.store.completions import CompletionStore
from oracle.store.keys import KeyStore
from oracle.store.ratelimit import RateLimiter
from oracle.store.redis_server import async_client
from oracle.trust.taint import TaintLedger
from shard_common.settings import add_option

from .auth import Authenticator, RateLimits
from .state import OracleState

log = logging.getLogger("oracle")


def add_redis_options(p: argparse.ArgumentParser) -> None:
    add_option(p, "--redis-url", default=None,
               help="redis://, rediss:// or unix:// URL; without it an embedded Redis runs in the data directory")
    add_option(p, "--redis-prefix", default="shard:", help="prefix of every Redis key")
    add_option(p, "--data-dir", default=str(Path.home() / ".shard" / "oracle"), help="where the Oracle keeps its files")


def add_storage_options(p: argparse.ArgumentParser) -> None:
    add_redis_options(p)
    add_option(p, "--no-auth", action="store_true", default=False, help="accept requests without API keys (local demos only)")
    add_option(p, "--no-store", action="store_true", default=False, help="never store chat completions or responses")
    add_option(p, "--store-ttl-days", default=30.0, type=float, help="how long stored completions and responses are kept")
    add_option(p, "--auth-cache-seconds", default=5.0, type=float,
               help="how long a verified key is trusted without asking Redis (revocations take this long)")


async def ensure_admin_key(keys: KeyStore) -> None:
    """First start: make an admin key (or take SHARD_ADMIN_KEY) and print it once."""
    from_env = os.environ.get("SHARD_ADMIN_KEY")
    if from_env:
        if await keys.lookup(from_env) is None:
            await keys.create(f"admin-env-{os.getpid()}", role="admin", secret=from_env)
            log.warning("created the admin key given in SHARD_ADMIN_KEY")
        return
    if await keys.any_active():
        return
    secret, record = await keys.create("admin", role="admin")
    print(f"\n  No API keys existed, so an admin key was created. It is shown only this once:\n\n    {secret}\n",
          file=sys.stderr, flush=True)
    log.warning("created admin key %s (%s)", record.id, record.prefix)


async def connect(state: OracleState, args: argparse.Namespace, redis_url: str) -> None:
    client = async_client(redis_url)
    if args.no_auth:
        log.warning("--no-auth: ANY CLIENT CAN USE THIS SERVER WITHOUT A KEY, without limits")
    else:
        keys = KeyStore(client, args.redis_prefix)
        state.auth = Authenticator(keys, cache_seconds=args.auth_cache_seconds)
        state.rate_limits = RateLimits(RateLimiter(client, args.redis_prefix))
        try:
            await ensure_admin_key(keys)
        except (RedisError, OSError) as e:
            log.error("Redis unreachable at startup (%s): requests will get 503 until it answers", e)
    if not args.no_store:
        journal = Path(args.data_dir) / "pending-completions.jsonl"
        ttl = int(args.store_ttl_days * 86400)
        state.completions = CompletionStore(client, args.redis_prefix, ttl, journal=journal)
        state.completions.start_flusher()
        state.responses = CompletionStore(client, args.redis_prefix, ttl, journal=Path(args.data_dir) / "pending-responses.jsonl", kind="resp")
        state.responses.start_flusher()


class TaintMarker:
    """Marks stored chat completions and responses that a Scout which later failed a check had
    computed (the trust package names them by id; this writes the marks into the store the id
    belongs to, retrying while Redis is away)."""

    def __init__(self, taint: TaintLedger, completions: CompletionStore, responses: CompletionStore | None = None,
                 interval_seconds: float = 1.0):
        self.taint = taint
        self.completions = completions
        self.responses = responses
        self.interval = interval_seconds
        self._waiting: list[tuple[str, dict]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._waiting += self.taint.take_marks()
            while self._waiting:
                ident, mark = self._waiting[0]
                try:
                    store = self.responses if self.responses is not None and ident.startswith("resp_") else self.completions
                    await store.mark_tainted(ident, mark)
                except (RedisError, OSError) as e:
                    log.warning("could not mark completion %s as tainted yet (Redis: %s)", ident, e)
                    break
                self._waiting.pop(0)
