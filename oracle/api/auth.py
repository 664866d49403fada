"""Who is calling: API key verification with a short cache, and per-key rate limits."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from aiohttp import web
from redis.exceptions import RedisError

from oracle.store.keys import ApiKey, KeyStore, hash_secret
from oracle.store.ratelimit import Decision, RateLimiter

from .errors import APIError

log = logging.getLogger(__name__)

# With --no-auth every caller is this key: unlimited, and sees every stored completion.
ANONYMOUS = ApiKey(id="anonymous", name="anonymous", prefix="", role="admin", rpm=0, tpm=0, created=0)


def invalid_key() -> APIError:
    return APIError(401, "Incorrect API key provided. Pass it as 'Authorization: Bearer sk-oracle-...' or 'X-API-Key'.",
                    code="invalid_api_key")


def presented_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.headers.get("X-API-Key")


class Authenticator:
    """Verified keys are cached for ``cache_seconds`` (so a revocation reaches every replica within
    that time); while Redis is unreachable, a key verified within ``outage_grace`` still works and
    any other gets a 503. Keys are only ever handled as SHA-256 digests: a presented key is looked
    up by its digest (here and in Redis), never compared character by character with a stored
    one, so response timing says nothing about how much of a guess was right."""

    def __init__(self, keys: KeyStore, cache_seconds: float = 5.0, outage_grace: float = 600.0, max_cached: int = 10_000):
        self.keys = keys
        self.cache_seconds = cache_seconds
        self.outage_grace = outage_grace
        # Bounded, least recently verified out first: a flood of made-up keys cannot grow it.
        self.max_cached = max_cached
        self._cache: OrderedDict[str, tuple[ApiKey | None, float]] = OrderedDict()

    async def verify(self, secret: str | None) -> ApiKey:
        if not secret:
            raise invalid_key()
        digest = hash_secret(secret)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and now - cached[1] < self.cache_seconds:
            key = cached[0]
            self._cache.move_to_end(digest)
        else:
            try:
                key = await self.keys.lookup(secret)
            except (RedisError, OSError) as e:
                if cached is not None and cached[0] is not None and now - cached[1] < self.outage_grace:
                    log.warning("Redis unreachable (%s): accepting recently verified key %s", e, cached[0].id)
                    return cached[0]
                raise APIError(503, "Cannot verify API keys right now (the key store is unreachable). Retry shortly.",
                               type="server_error", code="auth_unavailable", headers={"Retry-After": "2"}) from e
            self._cache[digest] = (key, now)
            self._cache.move_to_end(digest)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        if key is None:
            raise invalid_key()
        return key


class RateLimits:
    """Charges requests and tokens against a key's limits; fails open (logged) while Redis is down."""

    def __init__(self, limiter: RateLimiter):
        self.limiter = limiter

    async def charge(self, key: ApiKey, requests: int = 1, tokens: int = 0) -> Decision | None:
        if key.rpm <= 0 and key.tpm <= 0:
            return None
        if key.tpm > 0 and tokens > key.tpm:
            raise APIError(429, f"This request needs {tokens} tokens but the key's limit is {key.tpm} tokens per minute.",
                           type="tokens", code="rate_limit_exceeded")
        try:
            decision = await self.limiter.charge(key.id, key.rpm, key.tpm, requests, tokens)
        except (RedisError, OSError) as e:
            log.warning("Redis unreachable (%s): rate limits not enforced for this request", e)
            return None
        if not decision.allowed:
            retry = max(1, -(-decision.retry_after_ms // 1000))
            what = "requests" if requests and decision.requests_remaining < requests else "tokens"
            raise APIError(429, f"Rate limit reached for {what} per minute on key {key.name!r}. Try again in {retry}s.",
                           type=what, code="rate_limit_exceeded", headers={"Retry-After": str(retry), **decision.headers()})
        return decision

    async def settle(self, key: ApiKey, reserved: int, used: int) -> None:
        """Correct a reservation to what the request really used."""
        if key.tpm <= 0 or reserved == used:
            return
        try:
            await self.limiter.charge(key.id, key.rpm, key.tpm, 0, used - reserved, force=True)
        except (RedisError, OSError) as e:
            log.warning("Redis unreachable (%s): token usage of key %s not settled", e, key.id)
