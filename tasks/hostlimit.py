"""Cluster-wide politeness per host, in Redis: an adaptive leased semaphore, an optional token bucket, and pauses.

  ff:host:<host>:slots   zset   lease id -> lease expiry (ms); an expired lease frees its slot by itself
  ff:host:<host>:bucket  hash   tokens, ts (ms)                    (only with a rate)
  ff:host:<host>:pause   string set with PX until the host may be contacted again
  ff:host:<host>:wait    zset   task id -> first time it found no slot (its place in line)
  ff:host:<host>:free    list   a token per slot given back (or added by a grown window) while tasks wait
  ff:host:<host>:stats   hash   avg_ms: moving average of how long a download holds a slot;
                                window, ok, halved, cut_at: the host's adaptive window (below);
                                errors: present while `errors` may count a streak (a success ends it);
                                kept for an hour after the host's last download
  ff:host:<host>:errors  string server errors (5xx) from the host in a row, any worker; a success resets it
  ff:paused              zset   host -> paused-until (ms), for `status`
Every decision is one Lua script run, using the server's clock, so all workers on all machines agree.

The adaptive window: the per-host limit (`--per-host`, FLEETFETCH_PER_HOST) is a ceiling. A host starts with a
window of START slots; each time it has served a window's worth of downloads while (nearly) all the window's
slots were in use, the window grows: it doubles until the host first showed stress, then grows by one (TCP's
slow start and congestion avoidance, over connections). A sign of stress from the host (a 429/503 or other
retryable status, a timeout, a reset or cut-short body) halves it, at most once per the host's average download
time (the downloads already in flight when it was halved do not halve it again), never below one.

A pool thread that finds no free slot waits (BLPOP on `free`) until a slot is given back or the window grows,
on any worker of any machine, or until its estimated turn for a re-check: a slot does not stay idle while the
threads waiting for it sleep out a guess. Tokens are only a wake-up: the woken task still asks for the slot.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import time
from dataclasses import dataclass, field
from typing import cast

import redis

from .config import Settings

MAX_WAIT_S = 8.0  # longest a task waits before asking for a slot again
START = 8  # a host's first window: browsers open 6 connections per host
PAUSED_KEY = "ff:paused"


class _LeaseIds:
    """Lease ids unique across the cluster: a random prefix per process (drawn again in a forked child) and a
    counter. One `uuid4` per slot taken was a `getrandom` call and ~1 % of a worker's Python time."""

    def __init__(self) -> None:
        self.reset()
        os.register_at_fork(after_in_child=self.reset)

    def reset(self) -> None:
        self._prefix, self._count = secrets.token_hex(8), itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count):x}"


_lease_ids = _LeaseIds()


def new_lease_id() -> str:
    return _lease_ids.next()

# Every script starts with this: times in ms on the server's clock (TIME), so workers on every machine agree, and
# the window of a host not seen within the last hour.
PRELUDE = f"""
local START = {START}
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end
"""

# KEYS[1] slots, KEYS[2] bucket, KEYS[3] pause, KEYS[4] wait, KEYS[5] stats
# ARGV[1] per-host ceiling (0 = none), ARGV[2] lease ms, ARGV[3] lease id, ARGV[4] rate/s (0 = none),
# ARGV[5] waiter id, ARGV[6] '1' if the waiter may have a place in line (it found the host full before), else ''
# Returns {1, 0} with a slot; {0, ms} paused or out of tokens for ms;
# {0, -1, place in line, avg download ms, window} all of the window's slots in use.
ACQUIRE_BODY = """
local now = now_ms()
local paused = redis.call('PTTL', KEYS[3])
if paused > 0 then return {0, paused} end
local limit, lease, rate = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
if limit > 0 then
  local window = math.min(limit, tonumber(redis.call('HGET', KEYS[5], 'window')) or START)
  local used = redis.call('ZCARD', KEYS[1])
  -- lapsed leases (of dead workers) are dropped where they would count: in a full window
  if used >= window then used = used - redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now) end
  if used >= window then
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - 600000)
    redis.call('ZADD', KEYS[4], 'NX', now, ARGV[5])
    redis.call('PEXPIRE', KEYS[4], 600000)
    local avg = tonumber(redis.call('HGET', KEYS[5], 'avg_ms')) or 1000
    return {0, -1, redis.call('ZRANK', KEYS[4], ARGV[5]), math.floor(avg), window}
  end
else
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
end
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
if ARGV[6] == '1' then redis.call('ZREM', KEYS[4], ARGV[5]) end
return {1, 0}
"""

# KEYS[1] slots, KEYS[2] stats, KEYS[3] errors, KEYS[4] wait, KEYS[5] free
# ARGV[1] lease id, ARGV[2] ms the slot was held, ARGV[3] '1' if the host served the download (ends its error
# streak), ARGV[4] per-host ceiling (0 = none). Returns the host's window.
RELEASE_BODY = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then  -- given back already (a call sent again), or lapsed
  return tonumber(redis.call('HGET', KEYS[2], 'window')) or START
end
local s = redis.call('HMGET', KEYS[2], 'avg_ms', 'window', 'ok', 'halved', 'errors')
local avg, ms = tonumber(s[1]), tonumber(ARGV[2])
redis.call('HSET', KEYS[2], 'avg_ms', avg and (avg * 0.8 + ms * 0.2) or ms)
redis.call('PEXPIRE', KEYS[2], 3600000)
local limit = tonumber(ARGV[4])
local window = tonumber(s[2]) or START
local freed = 1
if ARGV[3] == '1' then
  if s[5] then  -- a streak to end (most successes have none: no DEL for them)
    redis.call('DEL', KEYS[3])
    redis.call('HDEL', KEYS[2], 'errors')
  end
  -- a ceiling not reached, the window (nearly) full: the host may prove a larger one (else it proved nothing);
  -- slots in use counted only then (with this one, just given back): a host at its ceiling spares the ZCARD
  if limit > 0 and window < limit and (redis.call('ZCARD', KEYS[1]) + 1) * 4 >= window * 3 then
    local ok = (tonumber(s[3]) or 0) + 1
    if ok >= window then
      local grown = math.min(limit, s[4] and window + 1 or window * 2)
      freed, window, ok = 1 + grown - window, grown, 0
    end
    redis.call('HSET', KEYS[2], 'window', window, 'ok', ok)
  end
end
-- wake as many waiters as slots came free, never more tokens than there are waiters
local waiting = redis.call('ZCARD', KEYS[4])
if waiting > 0 then
  for _ = 1, math.min(freed, waiting) do redis.call('RPUSH', KEYS[5], 1) end
  redis.call('LTRIM', KEYS[5], -waiting, -1)
  redis.call('PEXPIRE', KEYS[5], 60000)
end
return window
"""

ACQUIRE, RELEASE = PRELUDE + ACQUIRE_BODY, PRELUDE + RELEASE_BODY

# KEYS[1] stats. Halves the host's window unless it was halved less than one average
# download ago (what was in flight then does not count twice). Returns {window, 1 if it was halved now}.
_HALVE = PRELUDE + """
local now = now_ms()
local s = redis.call('HMGET', KEYS[1], 'window', 'cut_at', 'avg_ms')
local window = tonumber(s[1]) or START
if s[2] and now - tonumber(s[2]) < (tonumber(s[3]) or 1000) then return {window, 0} end
window = math.max(1, math.floor(window / 2))
redis.call('HSET', KEYS[1], 'window', window, 'ok', 0, 'halved', 1, 'cut_at', now)
redis.call('PEXPIRE', KEYS[1], 3600000)
return {window, 1}
"""

# KEYS[1] pause, KEYS[2] the paused-hosts index; ARGV[1] ms, ARGV[2] host. A longer pause in place is kept.
_PAUSE = PRELUDE + """
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], '1', 'PX', ms)
  redis.call('ZADD', KEYS[2], now_ms() + ms, ARGV[2])
end
return ms
"""

# KEYS[1] slots; ARGV[1] lease ms, ARGV[2] lease id. Extends a lease that still exists (XX), never re-creates one,
# and the set's own expiry with it: a set expiring 2 leases after its last acquire dropped a long download's slot.
_RENEW = PRELUDE + """
local lease = tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], 'XX', now_ms() + lease, ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[2]) then redis.call('PEXPIRE', KEYS[1], lease * 2) end
return 0
"""


@dataclass(frozen=True)
class HostKeys:
    """The Redis keys of one host's politeness state."""

    host: str

    def _key(self, part: str) -> str:
        return f"ff:host:{self.host}:{part}"

    slots = property(lambda self: self._key("slots"))
    bucket = property(lambda self: self._key("bucket"))
    pause = property(lambda self: self._key("pause"))
    wait = property(lambda self: self._key("wait"))
    stats = property(lambda self: self._key("stats"))
    errors = property(lambda self: self._key("errors"))
    free = property(lambda self: self._key("free"))


@dataclass
class Lease:
    host: str
    id: str
    limit: int = 0  # the ceiling it was taken under
    since: float = field(default_factory=time.monotonic)


class HostLimiter:
    """Acquire never blocks: it returns a lease, or how long to wait before asking again. `lease_s`
    (FLEETFETCH_HOST_LEASE): a killed worker's slot comes back after at most this long; live downloads renew it."""

    def __init__(self, client: redis.Redis, lease_s: float = Settings.host_lease) -> None:
        self.r, self.lease_s = client, lease_s
        self._acquire = client.register_script(ACQUIRE)
        self._pause = client.register_script(_PAUSE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(RELEASE)
        self._halve = client.register_script(_HALVE)

    def acquire(self, host: str, limit: int, rate: float = 0.0, waiter: str = "",
                waited: bool = True) -> tuple[Lease | None, float]:
        """A lease, or None and the seconds after which asking again is worth it. `waited`: the waiter may have a
        place in line to leave (it found the host full before); False spares a command per slot.

        All slots busy: the waiter gets a place in line, and comes back about when its turn is due
        (place / limit x the host's average download time), not in a tight loop."""
        lease_id = _lease_ids.next()
        keys, args = self.acquire_keys_args(host, limit, rate, waiter, waited, lease_id)
        return self.acquired(host, limit, lease_id, self._acquire(keys=keys, args=args))

    def acquire_keys_args(self, host: str, limit: int, rate: float, waiter: str, waited: bool,
                          lease_id: str) -> tuple[list[str], list[str | int | float]]:
        """The keys and arguments of the acquire script (ACQUIRE_BODY)."""
        k = HostKeys(host)
        return ([k.slots, k.bucket, k.pause, k.wait, k.stats],
                [limit, int(self.lease_s * 1000), lease_id, rate, waiter or lease_id, "1" if waited else ""])

    @staticmethod
    def acquired(host: str, limit: int, lease_id: str, reply: list) -> tuple[Lease | None, float]:
        """`acquire`'s answer from the acquire script's reply."""
        if reply[0]:
            return Lease(host, lease_id, limit), 0.0
        if reply[1] < 0:
            place, avg_ms, window = int(reply[2]), int(reply[3]), int(reply[4])
            turn = 1.25 * avg_ms / 1000 * (place + 1) / max(1, window)  # a little late beats a wasted re-check
            return None, min(MAX_WAIT_S, max(0.1, turn)) * random.uniform(0.9, 1.3)
        return None, reply[1] / 1000 + random.uniform(0, 0.25)

    def renew(self, lease: Lease) -> None:
        self._renew(keys=[HostKeys(lease.host).slots], args=[int(self.lease_s * 1000), lease.id])

    def release(self, lease: Lease, answered: bool = False) -> int:
        """Give the slot back; `answered`: the host served the download, so its server errors in a row end and
        its window may grow. Returns the host's window. Idempotent: a slot given back (or lapsed) counts once."""
        keys, args = self.release_keys_args(lease, answered)
        return int(self._release(keys=keys, args=args))

    @staticmethod
    def release_keys_args(lease: Lease, answered: bool) -> tuple[list[str], list[str | int]]:
        """The keys and arguments of the release script (RELEASE_BODY)."""
        k = HostKeys(lease.host)
        return ([k.slots, k.stats, k.errors, k.wait, k.free],
                [lease.id, int((time.monotonic() - lease.since) * 1000), int(answered), lease.limit])

    def wait(self, host: str, seconds: float) -> None:
        """Wait up to `seconds` (a waiter's next re-check) for a slot of `host` to come free anywhere: a
        release or a grown window wakes one waiter per free slot. Then ask for it (`acquire`)."""
        self.r.blpop([HostKeys(host).free], timeout=max(0.01, seconds))

    def halve(self, host: str) -> int | None:
        """The host showed stress (a throttling answer, a timeout, a reset): halve its window. Returns the new
        window, or None when it was halved less than one average download ago and stays as it is."""
        window, halved = self._halve(keys=[HostKeys(host).stats])
        return int(window) if halved else None

    def window(self, host: str) -> int:
        """The host's window now (START for a host with no download in the last hour), before any ceiling."""
        return int(self.r.hget(HostKeys(host).stats, "window") or START)

    def pause(self, host: str, seconds: float) -> None:
        """No worker contacts `host` for `seconds` (a longer pause already in place is kept)."""
        self._pause(keys=[HostKeys(host).pause, PAUSED_KEY], args=[max(1, int(seconds * 1000)), host])

    def server_error(self, host: str) -> int:
        """Count a 5xx from `host`; returns the host's server errors in a row, from any worker."""
        k = HostKeys(host)
        pipe = self.r.pipeline(transaction=True)
        pipe.incr(k.errors)
        pipe.pexpire(k.errors, 600_000)
        pipe.hset(k.stats, "errors", 1)  # the release of a download the host served ends the streak
        pipe.pexpire(k.stats, 3_600_000)
        return int(pipe.execute()[0])

    def free_all(self) -> int:
        """Every host slot and place in line given back: only for a caller that knows no worker holds one (local
        mode, holding its directory's lock, after its workers were killed). Returns the keys removed."""
        stale = [k for part in ("slots", "wait") for k in self.r.scan_iter(HostKeys("*")._key(part))]
        return int(cast(int, self.r.delete(*stale))) if stale else 0

    def paused(self) -> dict[str, float]:
        """Hosts paused now -> epoch seconds until which they are paused."""
        now_s, now_us = cast(tuple[int, int], self.r.time())
        self.r.zremrangebyscore(PAUSED_KEY, "-inf", now_s * 1000 + now_us // 1000)
        hosts = cast(list[tuple[bytes, float]], self.r.zrange(PAUSED_KEY, 0, -1, withscores=True))
        return {h.decode(): score / 1000 for h, score in hosts}
