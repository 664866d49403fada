"""Key verification: a flood of made-up keys cannot grow the cache; verified keys stay cached."""

from __future__ import annotations

import asyncio

import pytest

from oracle.api.auth import Authenticator
from oracle.api.errors import APIError
from oracle.store.keys import ApiKey, hash_secret

REAL = "sk-oracle-" + "r" * 40


class Keys:
    """One known key; counts lookups (a stand-in for the Redis-backed KeyStore)."""

    def __init__(self):
        self.lookups = 0

    async def lookup(self, secret: str) -> ApiKey | None:
        self.lookups += 1
        return ApiKey(id=hash_secret(secret)[:16], name="real", prefix=secret[:14], role="user", rpm=0, tpm=0, created=0) \
            if secret == REAL else None


def test_the_cache_is_bounded_and_keeps_recently_verified_keys():
    keys = Keys()
    auth = Authenticator(keys, cache_seconds=60, max_cached=100)

    async def flood():
        assert (await auth.verify(REAL)).name == "real"
        for i in range(1000):
            with pytest.raises(APIError) as e:
                await auth.verify(f"sk-oracle-guess-{i:040d}")
            assert e.value.status == 401
            if i % 50 == 0:
                await auth.verify(REAL)  # in use: stays cached
        await auth.verify(REAL)

    asyncio.run(flood())
    assert len(auth._cache) <= 100
    assert keys.lookups == 1 + 1000  # the key in use was looked up once, then always found in the cache
