"""Cluster-wide politeness per host, in Redis: a leased semaphore, an optional token bucket, and pauses.

  ff:host:<host>:slots   zset   lease id -> lease expiry (ms); an expired lease frees its slot by itself
  ff:host:<host>:bucket  hash   tokens, ts (ms)                    (only with a rate)
  ff:host:<host>:pause   string set with PX until the host may be contacted again
  ff:paused              zset   host -> paused-until (ms), for `status`
Every decision is one Lua script run, using the server's clock, so all workers on all machines agree.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import redis

LEASE_S = 60  # a killed worker's slot comes back after at most this long; live downloads renew it

_ACQUIRE = """
local now_t = redis.call('TIME')
local now = now_t[1] * 1000 + math.floor(now_t[2] / 1000)
local paused = redis.call('PTTL', KEYS[3])
if paused > 0 then return {0, paused} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit, lease, rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return {0, -1} end
if rate > 0 then
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or rate
  local ts = tonumber(b[2]) or now
  tokens = math.min(rate, tokens + (now - ts) * rate / 1000)
  if tokens < 1 then return {0, math.ceil((1 - tokens) * 1000 / rate)} end
  redis.call('HSET', KEYS[2], 'tokens', tokens - 1, 'ts', now)
  redis.call('PEXPIRE', KEYS[2], 60000)
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return {1, 0}
"""

_PAUSE = """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], t[1] * 1000 + math.floor(t[2] / 1000) + ms, ARGV[2])
end
return 0
"""

_RENEW = """
local t = redis.call('TIME')
return redis.call('ZADD', KEYS[1], 'XX', t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1]), ARGV[2])
"""


def _keys(host: str) -> list[str]:
    return [f"ff:host:{host}:slots", f"ff:host:{host}:bucket", f"ff:host:{host}:pause"]


@dataclass
class Lease:
    host: str
    id: str


class HostLimiter:
    """Acquire never blocks: it returns a lease, or how long to wait before asking again."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)
        self._renew = client.register_script(_RENEW)

    def acquire(self, host: str, limit: int, rate: float = 0.0) -> tuple[Lease | None, float]:
        lease_id = uuid.uuid4().hex
        ok, wait_ms = self._acquire(keys=_keys(host), args=[limit, LEASE_S * 1000, lease_id, rate])
        if ok:
            return Lease(host, lease_id), 0.0
        if wait_ms < 0:  # all slots busy: come back after a jittered moment, not in a tight loop
            return None, random.uniform(0.5, 2.0)
        return None, wait_ms / 1000 + random.uniform(0, 0.25)

    def renew(self, lease: Lease) -> None:
        self._renew(keys=[_keys(lease.host)[0]], args=[LEASE_S * 1000, lease.id])

    def release(self, lease: Lease) -> None:
        self.r.zrem(_keys(lease.host)[0], lease.id)

    def pause(self, host: str, seconds: float) -> None:
        """No worker contacts `host` for `seconds` (a longer pause already in place is kept)."""
        self._pause(keys=[_keys(host)[2], "ff:paused"], args=[max(1, int(seconds * 1000)), host])

    def paused(self) -> dict[str, float]:
        """Hosts paused now -> epoch seconds until which they are paused."""
        now_s, now_us = self.r.time()
        now_ms = now_s * 1000 + now_us // 1000
        self.r.zremrangebyscore("ff:paused", "-inf", now_ms)
        return {h.decode(): score / 1000 for h, score in self.r.zrange("ff:paused", 0, -1, withscores=True)}
