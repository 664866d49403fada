"""Scout reputation in Redis: golden-ticket results per peer id, the state they lead to
(active / quarantined / banned), and the evidence of every failure.

One Lua script records a result and applies the policy atomically, so Oracle replicas sharing a
Redis agree, and the state survives restarts. This module only stores; what the Oracle currently
believes about a peer lives in ``PeerHealth`` (oracle/trust/health.py), which keeps using the last
known states while Redis is away.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

STATES = ("active", "quarantined", "banned")

# KEYS: the peer's hash, its evidence list. ARGV: passed (1/0), now, window, failures to quarantine,
# failures to ban, ban seconds, evidence JSON, evidence kept. Returns {state, ban_until}.
RECORD_SCRIPT = """
local passed = tonumber(ARGV[1])
local now, window = tonumber(ARGV[2]), tonumber(ARGV[3])
local quarantine_at, ban_at, ban_seconds = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local recent = (redis.call('HGET', KEYS[1], 'recent') or '') .. (passed == 1 and '1' or '0')
if #recent > window then recent = string.sub(recent, #recent - window + 1) end
local failures = select(2, string.gsub(recent, '0', ''))
local state = redis.call('HGET', KEYS[1], 'state') or 'active'
local ban_until = tonumber(redis.call('HGET', KEYS[1], 'ban_until') or '0')
if state == 'banned' and ban_until <= now then
  state = 'quarantined'
end
if state ~= 'banned' then
  if failures >= ban_at then
    state, ban_until, recent = 'banned', now + ban_seconds, ''
  elseif failures >= quarantine_at then
    state = 'quarantined'
  elseif state == 'quarantined' and #recent >= window then
    state = 'active'
  end
end
redis.call('HINCRBY', KEYS[1], passed == 1 and 'passed' or 'failed', 1)
redis.call('HSET', KEYS[1], 'recent', recent, 'state', state, 'ban_until', tostring(ban_until), 'updated', tostring(now))
if passed == 0 then
  redis.call('LPUSH', KEYS[2], ARGV[7])
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[8]) - 1)
end
return {state, tostring(ban_until)}
"""


@dataclass
class TrustPolicy:
    """Defaults (docs/trust.md): honest Scouts never fail a ticket (the tolerance sits far above
    honest numeric noise), so one failure in the last 20 tickets already quarantines, three ban
    for an hour, and 20 clean tickets in a row end a quarantine."""

    window: int = 20
    quarantine_failures: int = 1
    ban_failures: int = 3
    ban_seconds: float = 3600.0
    evidence_kept: int = 20


class ReputationStore:
    def __init__(self, client: aioredis.Redis, prefix: str = "shard:", policy: TrustPolicy | None = None):
        self.client = client
        self.prefix = prefix
        self.policy = policy or TrustPolicy()
        self._script = client.register_script(RECORD_SCRIPT)

    def _key(self, peer: str) -> str:
        return f"{self.prefix}rep:{peer}"

    async def record(self, peer: str, passed: bool, evidence: dict | None = None) -> tuple[str, float]:
        """Count one verdict; returns the peer's (state, ban_until) after it. Raises RedisError or
        OSError when Redis is away."""
        p = self.policy
        state, ban_until = await self._script(
            keys=[self._key(peer), self._key(peer) + ":evidence"],
            args=[1 if passed else 0, time.time(), p.window, p.quarantine_failures, p.ban_failures, p.ban_seconds,
                  json.dumps(evidence or {}), p.evidence_kept])
        return state, float(ban_until)

    async def states(self) -> dict[str, tuple[str, float]]:
        """Every known peer's (state, ban_until): reputation survives Oracle restarts."""
        return {peer: (r["state"], r["ban_until"]) for peer, r in (await self.list()).items()}

    async def list(self) -> dict[str, dict]:
        out = {}
        async for key in self.client.scan_iter(match=f"{self.prefix}rep:*", count=500):
            if key.endswith(":evidence"):
                continue
            peer = key[len(self.prefix) + 4:]
            h = await self.client.hgetall(key)
            passed, failed = int(h.get("passed", 0)), int(h.get("failed", 0))
            recent = h.get("recent", "")
            out[peer] = {"peer_id": peer, "state": h.get("state", "active"), "passed": passed, "failed": failed,
                         "recent": recent, "score": round(recent.count("1") / len(recent), 4) if recent else None,
                         "ban_until": float(h.get("ban_until", 0) or 0), "updated": float(h.get("updated", 0) or 0)}
        return out

    async def evidence(self, peer: str) -> list[dict]:
        return [json.loads(e) for e in await self.client.lrange(self._key(peer) + ":evidence", 0, -1)]

    async def set_state(self, peer: str, state: str) -> bool:
        """An operator's decision (unban: back to active with a clean window). False: unknown peer."""
        if not await self.client.exists(self._key(peer)):
            return False
        await self.client.hset(self._key(peer), mapping={"state": state, "ban_until": "0", "recent": ""})
        return True

    async def reset(self, peer: str) -> bool:
        """Forget everything about ``peer``. False: unknown peer."""
        removed = await self.client.delete(self._key(peer), self._key(peer) + ":evidence")
        return removed > 0
