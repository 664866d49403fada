"""Stored chat completions (and, in a store of their own kind, responses), by id, with a per-key
index for listing.

Layout (``P`` is the prefix, ``K`` the kind: ``cmpl`` for chat completions, ``resp`` for responses):
    P K:<id>            string  the stored record as JSON (TTL)
    P K_index:<key id>  zset    ids by creation time (ms) for one key
    P K_index           zset    ids of every key, for admins

Writes that fail because Redis is unreachable go to ``PendingWrites``: a bounded queue mirrored
to a journal file, flushed in order once Redis answers again, so no completion is lost to an
outage or to an Oracle restart during one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)


class PendingWrites:
    def __init__(self, journal: Path | None, max_items: int = 10000):
        self.journal = journal
        self.max_items = max_items
        self.items: OrderedDict[str, dict] = OrderedDict()
        if journal is not None and journal.exists():
            for line in journal.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash mid-write
                self.items[record["id"]] = record
            if self.items:
                log.warning("%d stored completions from a Redis outage are waiting to be written", len(self.items))

    def add(self, record: dict) -> bool:
        if len(self.items) >= self.max_items:
            log.error("completion buffer full (%d): dropping %s", self.max_items, record["id"])
            return False
        self.items[record["id"]] = record
        if self.journal is not None:
            with self.journal.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return True

    def done(self, ident: str) -> None:
        self.items.pop(ident, None)
        if self.journal is not None:
            if self.items:
                tmp = self.journal.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.items.values()))
                tmp.replace(self.journal)
            else:
                self.journal.unlink(missing_ok=True)


class CompletionStore:
    def __init__(self, redis: aioredis.Redis, prefix: str = "shard:", ttl_seconds: int = 30 * 86400, journal: Path | None = None,
                 kind: str = "cmpl"):
        self.redis = redis
        self.prefix = prefix
        self.kind = kind
        self.ttl = ttl_seconds
        self.pending = PendingWrites(journal)
        self._flusher: asyncio.Task | None = None

    def _key(self, ident: str) -> str:
        return f"{self.prefix}{self.kind}:{ident}"

    def _index(self, owner: str | None) -> str:
        return f"{self.prefix}{self.kind}_index" + (f":{owner}" if owner else "")

    async def _write(self, record: dict) -> None:
        score = int(record["created_ms"])
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._key(record["id"]), json.dumps(record), ex=self.ttl)
            pipe.zadd(self._index(record["owner"]), {record["id"]: score})
            pipe.zadd(self._index(None), {record["id"]: score})
            await pipe.execute()

    async def save(self, record: dict) -> None:
        """Store now, or buffer when Redis is unreachable (never raises for an outage)."""
        if not self.pending.items:
            try:
                await self._write(record)
                return
            except (RedisError, OSError) as e:
                log.warning("Redis unreachable (%s): buffering completion %s", e, record["id"])
        self.pending.add(record)
        self.start_flusher()

    def start_flusher(self) -> None:
        if self.pending.items and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        delay = 0.5
        while self.pending.items:
            record = next(iter(self.pending.items.values()))
            try:
                await self._write(record)
            except (RedisError, OSError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.5
            self.pending.done(record["id"])
        log.info("buffered completions written to Redis")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()

    def _visible(self, record: dict | None, owner: str | None) -> dict | None:
        if record is None or (owner is not None and record["owner"] != owner):
            return None
        return record

    async def get(self, ident: str, owner: str | None) -> dict | None:
        """``owner`` None means an admin, who sees every key's completions."""
        if ident in self.pending.items:
            return self._visible(self.pending.items[ident], owner)
        raw = await self.redis.get(self._key(ident))
        return self._visible(json.loads(raw) if raw else None, owner)

    async def list(self, owner: str | None, limit: int = 20, after: str | None = None, order: str = "asc",
                   model: str | None = None, metadata: dict[str, str] | None = None) -> tuple[list[dict], bool]:
        index = self._index(owner)
        ids = await (self.redis.zrange(index, 0, -1) if order == "asc" else self.redis.zrevrange(index, 0, -1))
        ids = ids + [i for i in self.pending.items if i not in ids and self._visible(self.pending.items[i], owner)]
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        out, has_more = [], False
        for ident in ids:
            record = await self.get(ident, owner)
            if record is None:
                if ident not in self.pending.items:
                    await self.redis.zrem(index, ident)  # expired: drop it from the index
                continue
            if model is not None and record["completion"]["model"] != model:
                continue
            if metadata and any(record.get("metadata", {}).get(k) != v for k, v in metadata.items()):
                continue
            if len(out) == limit:
                has_more = True
                break
            out.append(record)
        return out, has_more

    async def update_metadata(self, ident: str, owner: str | None, metadata: dict[str, str]) -> dict | None:
        record = await self.get(ident, owner)
        if record is None:
            return None
        record["metadata"] = metadata
        ttl = await self.redis.ttl(self._key(ident))
        await self.redis.set(self._key(ident), json.dumps(record), ex=ttl if ttl and ttl > 0 else self.ttl)
        return record

    async def mark_tainted(self, ident: str, mark: dict) -> bool:
        """Add ``mark`` (a Scout that computed it failed a check) to a stored object's
        ``tainted_by``; False when it is not stored (any more)."""
        if ident in self.pending.items:
            record = self.pending.items[ident]
        else:
            raw = await self.redis.get(self._key(ident))
            if raw is None:
                return False
            record = json.loads(raw)
        marks = record.setdefault("tainted_by", [])
        if any(m["peer_id"] == mark["peer_id"] for m in marks):
            return True
        marks.append(mark)
        if ident not in self.pending.items:
            ttl = await self.redis.ttl(self._key(ident))
            await self.redis.set(self._key(ident), json.dumps(record), ex=ttl if ttl and ttl > 0 else self.ttl)
        return True

    async def delete(self, ident: str, owner: str | None) -> bool:
        record = await self.get(ident, owner)
        if record is None:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(ident))
            pipe.zrem(self._index(record["owner"]), ident)
            pipe.zrem(self._index(None), ident)
            await pipe.execute()
        return True

    async def ttl_of(self, ident: str) -> int:
        return await self.redis.ttl(self._key(ident))
