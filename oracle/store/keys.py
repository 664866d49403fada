"""API keys: only a SHA-256 of each key is stored, with its name, role, limits and revoked flag.

Layout (``P`` is the prefix, ``shard:`` by default):
    P apikey:<sha256>   hash  id, name, prefix, role, rpm, tpm, created, revoked
    P apikeys           set   sha256 of every key ever created
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import asdict, dataclass

import redis.asyncio as aioredis

KEY_PREFIX = "sk-oracle-"
ROLES = ("admin", "user")


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    role: str
    rpm: int
    tpm: int
    created: int
    revoked: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @classmethod
    def from_hash(cls, data: dict) -> "ApiKey":
        return cls(
            id=data["id"], name=data["name"], prefix=data["prefix"], role=data["role"], rpm=int(data["rpm"]),
            tpm=int(data["tpm"]), created=int(data["created"]), revoked=data.get("revoked") == "1",
        )

    def to_hash(self) -> dict:
        d = asdict(self)
        d["revoked"] = "1" if self.revoked else "0"
        return d


class UnknownKey(LookupError):
    pass


class KeyStore:
    def __init__(self, redis: aioredis.Redis, prefix: str = "shard:"):
        self.redis = redis
        self.prefix = prefix

    def _key(self, digest: str) -> str:
        return f"{self.prefix}apikey:{digest}"

    async def create(self, name: str, role: str = "user", rpm: int = 0, tpm: int = 0, secret: str | None = None) -> tuple[str, ApiKey]:
        """Returns (the key itself, shown once; its record). ``rpm``/``tpm`` 0 means unlimited."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if any(k.name == name and not k.revoked for k in await self.list()):
            raise ValueError(f"a key named {name!r} already exists")
        secret = secret or new_secret()
        if not secret.startswith(KEY_PREFIX) or len(secret) < len(KEY_PREFIX) + 32:
            raise ValueError(f"keys look like {KEY_PREFIX} followed by at least 32 characters")
        digest = hash_secret(secret)
        record = ApiKey(id=digest[:16], name=name, prefix=secret[: len(KEY_PREFIX) + 4], role=role, rpm=rpm, tpm=tpm, created=int(time.time()))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(digest), mapping=record.to_hash())
            pipe.sadd(f"{self.prefix}apikeys", digest)
            await pipe.execute()
        return secret, record

    async def lookup(self, secret: str) -> ApiKey | None:
        """The key's record, or None when unknown or revoked."""
        data = await self.redis.hgetall(self._key(hash_secret(secret)))
        if not data:
            return None
        key = ApiKey.from_hash(data)
        return None if key.revoked else key

    async def list(self) -> list[ApiKey]:
        digests = await self.redis.smembers(f"{self.prefix}apikeys")
        keys = []
        for digest in sorted(digests):
            data = await self.redis.hgetall(self._key(digest))
            if data:
                keys.append(ApiKey.from_hash(data))
        return sorted(keys, key=lambda k: (k.created, k.name))

    async def revoke(self, ident: str) -> ApiKey:
        """Revoke by id, name or shown prefix; it must match exactly one live key."""
        matches = [k for k in await self.list() if not k.revoked and ident in (k.id, k.name, k.prefix)]
        if len(matches) != 1:
            raise UnknownKey(f"{ident!r} matches {len(matches)} active keys; give the key id")
        digests = await self.redis.smembers(f"{self.prefix}apikeys")
        digest = next(d for d in digests if d.startswith(matches[0].id))
        await self.redis.hset(self._key(digest), "revoked", "1")
        return matches[0]

    async def any_active(self) -> bool:
        return any(not k.revoked for k in await self.list())
