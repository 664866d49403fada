"""Per-key requests- and tokens-per-minute limits, enforced atomically in Redis.

Each limit is a token bucket holding up to one minute's allowance and refilling continuously.
One Lua script checks and charges both buckets at once, so any number of Oracle replicas
sharing a Redis enforce one limit together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

# KEYS: request bucket, token bucket. ARGV: now_ms, rpm, tpm, request cost, token cost, force.
# A negative token cost refunds (a reservation that was too large); force=1 charges even past
# the limit (a request that used more than it reserved runs the bucket into debt).
# Returns {allowed, req_level, req_refill_ms, tok_level, tok_refill_ms, retry_ms}.
CHARGE_SCRIPT = """
local now = tonumber(ARGV[1])
local limits = {tonumber(ARGV[2]), tonumber(ARGV[3])}
local costs = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local levels = {}
local allowed = 1
local retry = 0
local force = tonumber(ARGV[6]) == 1
for i = 1, 2 do
  local limit = limits[i]
  if limit > 0 then
    local state = redis.call('HMGET', KEYS[i], 'level', 'ts')
    local level = tonumber(state[1]) or limit
    local ts = tonumber(state[2]) or now
    level = math.min(limit, level + math.max(0, now - ts) * limit / 60000)
    levels[i] = level
    if costs[i] > 0 and level < costs[i] and not force then
      allowed = 0
      retry = math.max(retry, math.ceil((costs[i] - level) * 60000 / limit))
    end
  end
end
for i = 1, 2 do
  local limit = limits[i]
  if limit > 0 then
    local level = levels[i]
    if allowed == 1 or costs[i] < 0 then
      level = math.min(limit, level - costs[i])
    end
    levels[i] = level
    redis.call('HSET', KEYS[i], 'level', tostring(level), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[i], 120000)
  else
    levels[i] = -1
  end
end
local function refill(i)
  if limits[i] <= 0 then return 0 end
  return math.ceil((limits[i] - levels[i]) * 60000 / limits[i])
end
return {allowed, tostring(levels[1]), refill(1), tostring(levels[2]), refill(2), retry}
"""


@dataclass
class Decision:
    allowed: bool
    rpm: int
    tpm: int
    requests_remaining: int
    requests_reset_ms: int
    tokens_remaining: int
    tokens_reset_ms: int
    retry_after_ms: int = 0

    def headers(self) -> dict[str, str]:
        out = {}
        if self.rpm > 0:
            out.update({
                "x-ratelimit-limit-requests": str(self.rpm),
                "x-ratelimit-remaining-requests": str(max(0, self.requests_remaining)),
                "x-ratelimit-reset-requests": duration(self.requests_reset_ms),
            })
        if self.tpm > 0:
            out.update({
                "x-ratelimit-limit-tokens": str(self.tpm),
                "x-ratelimit-remaining-tokens": str(max(0, self.tokens_remaining)),
                "x-ratelimit-reset-tokens": duration(self.tokens_reset_ms),
            })
        return out


def duration(ms: int) -> str:
    """OpenAI's reset format: "1s", "850ms", "6m0s"."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds - 60 * minutes)}s"


class RateLimiter:
    def __init__(self, redis: aioredis.Redis, prefix: str = "shard:"):
        self.redis = redis
        self.prefix = prefix
        self._script = redis.register_script(CHARGE_SCRIPT)

    async def charge(self, key_id: str, rpm: int, tpm: int, requests: int = 1, tokens: int = 0, force: bool = False) -> Decision:
        keys = [f"{self.prefix}rl:{key_id}:req", f"{self.prefix}rl:{key_id}:tok"]
        now = int(time.time() * 1000)
        allowed, req_level, req_reset, tok_level, tok_reset, retry = await self._script(
            keys=keys, args=[now, rpm, tpm, requests, tokens, int(force)]
        )
        return Decision(
            allowed=bool(allowed), rpm=rpm, tpm=tpm,
            requests_remaining=math.floor(float(req_level)), requests_reset_ms=int(req_reset),
            tokens_remaining=math.floor(float(tok_level)), tokens_reset_ms=int(tok_reset),
            retry_after_ms=int(retry),
        )
