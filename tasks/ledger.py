"""The job ledger in Redis: the URLs of a job, each URL's state, its one final record, and counters.

Keys share the hash tag `{JOB}` (Redis Cluster keeps them on one node):
  ff:{JOB}:meta   hash   job settings + counters n:<state>, bytes, published
  ff:{JOB}:urls   hash   index -> [url, name, sha256|null(, the URL's own options)]  (what `resume` re-enqueues)
  ff:{JOB}:state  hash   index -> state
  ff:{JOB}:rec    hash   index -> final record (JSON), compact: no field the ledger already knows (`compact`)
  ff:{JOB}:due    zset   index -> time (ms) by which a worker must be heard of again: the lease of a running URL,
                         the countdown of a retrying one (+ the lease); a final state removes it
  ff:jobs         zset   job id -> creation time
State changes run as one Lua script, so counters always match the states and a URL gets at most one
final record, however many times its task is delivered.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .message import is_secret_header
from .redact import redact_url

QUEUED, STARTED, RETRYING = "queued", "started", "retrying"
DONE, UNCHANGED, FAILED, CANCELLED = "done", "unchanged", "failed", "cancelled"
FINAL = (DONE, UNCHANGED, FAILED, CANCELLED)
STATES = (QUEUED, STARTED, RETRYING, *FINAL)
JOBS_KEY = "ff:jobs"
LIVE_KEY = "ff:live"  # set of jobs not finished yet: what the reconciler looks at
BATCH = 2000
CANCELLED_AT = "cancelled"  # meta field: when `cancel` stopped the job (absent: not cancelled)
CREDENTIALS = "credentials"  # meta field: the job's netrc logins and cookies (tasks.credentials), read by workers
SECRET_HEADERS = "secret_headers"  # meta field: the job's secret headers (JSON pairs), read by the workers
FED = "fed"  # meta field: URLs below this index have been offered to the broker (feed.Feeder); absent: all were
Row = tuple[int, str, str, str | None, dict[str, Any]]  # index, url, name, sha256, the URL's own options

# KEYS[1] meta, KEYS[2] state, KEYS[3] rec, KEYS[4] due
# ARGV[1] index, ARGV[2] new state, ARGV[3] final record JSON or '', ARGV[4] bytes to count, ARGV[5] ttl (s),
# ARGV[6] ms from now by which a worker must be heard of again for this URL (its lease); '' = none (final)
# A URL without a state yet counts as published (`published` = URLs that have a state): its message was taken
# before the publisher marked it queued (mark_queued then leaves it).
# Returns the final state the URL already had (then nothing changes), or false. A URL about to start in a job
# that was cancelled (meta field `cancelled`) ends cancelled instead, and 'cancelled' is returned: the worker
# skips it in the same round trip.
_TRANSITION = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old == 'done' or old == 'unchanged' or old == 'failed' or old == 'cancelled' then return old end
if not old then redis.call('HINCRBY', KEYS[1], 'published', 1) end
if ARGV[2] == 'started' and redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
  redis.call('HSET', KEYS[2], ARGV[1], 'cancelled')
  if old then redis.call('HINCRBY', KEYS[1], 'n:' .. old, -1) end
  redis.call('HINCRBY', KEYS[1], 'n:cancelled', 1)
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 'cancelled'
end
if old ~= ARGV[2] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  if old then redis.call('HINCRBY', KEYS[1], 'n:' .. old, -1) end
  redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[2], 1)
end
if ARGV[6] == '' then
  redis.call('ZREM', KEYS[4], ARGV[1])
else
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[4], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[6]), ARGV[1])
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'bytes', tonumber(ARGV[4]))
end
if redis.call('TTL', KEYS[3]) < 0 then
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5])) end
end
return false
"""

# KEYS[1] due; ARGV[1] ms from now, ARGV[2..] indexes. Extends the leases that still exist (XX): a URL that
# reached its final state meanwhile is not given a lease again.
_RENEW = """
local t = redis.call('TIME')
local at = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', at, ARGV[i]) end
return #ARGV - 1
"""


# KEYS[1] state, KEYS[2] due; ARGV[1] ms from now, ARGV[2..] indexes. A lease for each URL that is not final,
# whether it had one or not (a worker holds its message).
_HOLD = """
local t = redis.call('TIME')
local at = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  local s = redis.call('HGET', KEYS[1], ARGV[i])
  if s ~= 'done' and s ~= 'unchanged' and s ~= 'failed' and s ~= 'cancelled' then
    redis.call('ZADD', KEYS[2], at, ARGV[i])
  end
end
return 0
"""

# KEYS[1] meta, KEYS[2] state, KEYS[3] due, KEYS[4] redelivered; ARGV[1..] indexes
# Each URL not final goes back to queued (counters kept), loses its lease and counts one more redelivery.
# Returns {index, redeliveries, ...} for the URLs moved.
_REQUEUE = """
local out = {}
for i = 1, #ARGV do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  redis.call('ZREM', KEYS[3], ARGV[i])
  if old ~= 'done' and old ~= 'unchanged' and old ~= 'failed' and old ~= 'cancelled' then
    if old ~= 'queued' then
      redis.call('HSET', KEYS[2], ARGV[i], 'queued')
      if old then redis.call('HINCRBY', KEYS[1], 'n:' .. old, -1) end
      redis.call('HINCRBY', KEYS[1], 'n:queued', 1)
    end
    table.insert(out, tonumber(ARGV[i]))
    table.insert(out, redis.call('HINCRBY', KEYS[4], ARGV[i], 1))
  end
end
local ttl = redis.call('TTL', KEYS[1])
if ttl > 0 then redis.call('EXPIRE', KEYS[4], ttl) end
return out
"""

# KEYS[1] meta, KEYS[2] state; ARGV[1] ttl (s), ARGV[2..] indexes just published
# Each URL without a state becomes queued; returns how many did.
_MARK_QUEUED = """
local n = 0
for i = 2, #ARGV do n = n + redis.call('HSETNX', KEYS[2], ARGV[i], 'queued') end
redis.call('HINCRBY', KEYS[1], 'n:queued', n)
redis.call('HINCRBY', KEYS[1], 'published', n)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return n
"""

# KEYS[1] meta, KEYS[2] state, KEYS[3] due; ARGV[1] ttl (s), ARGV[2..] indexes
# Each URL not started and not final (never published, queued, retrying) becomes cancelled; a URL never published
# counts as published (published = URLs that have a state). Started ones are left to their worker. Returns the count.
_CANCEL = """
local n = 0
for i = 2, #ARGV do
  local old = redis.call('HGET', KEYS[2], ARGV[i])
  if not old or old == 'queued' or old == 'retrying' then
    redis.call('HSET', KEYS[2], ARGV[i], 'cancelled')
    if old then redis.call('HINCRBY', KEYS[1], 'n:' .. old, -1) else redis.call('HINCRBY', KEYS[1], 'published', 1) end
    redis.call('HINCRBY', KEYS[1], 'n:cancelled', 1)
    redis.call('ZREM', KEYS[3], ARGV[i])
    n = n + 1
  end
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return n
"""

# KEYS[1] meta, KEYS[2] state, KEYS[3] rec; ARGV[1..] indexes
# Each cancelled URL goes back to "never published" (no state, no record), for `resume`. Returns the count.
_UNCANCEL = """
local n = 0
for i = 1, #ARGV do
  if redis.call('HGET', KEYS[2], ARGV[i]) == 'cancelled' then
    redis.call('HDEL', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
    redis.call('HINCRBY', KEYS[1], 'n:cancelled', -1)
    redis.call('HINCRBY', KEYS[1], 'published', -1)
    n = n + 1
  end
end
return n
"""


class JobGone(LookupError):
    """The backend has no such job: expired, never created, or the server came back empty."""


@dataclass(frozen=True)
class JobKeys:
    """The Redis keys of one job; the hash tag `{JOB}` keeps them on one Redis Cluster node."""

    job: str

    def _key(self, part: str) -> str:
        return f"ff:{{{self.job}}}:{part}"

    @property
    def meta(self) -> str:
        return self._key("meta")

    @property
    def urls(self) -> str:
        return self._key("urls")

    @property
    def state(self) -> str:
        return self._key("state")

    @property
    def rec(self) -> str:
        return self._key("rec")

    @property
    def due(self) -> str:
        """zset index -> server time (ms) by which a worker must be heard of again for a non-final URL."""
        return self._key("due")

    @property
    def redelivered(self) -> str:
        """hash index -> times the reconciler published the URL again."""
        return self._key("redelivered")

    @property
    def suspect(self) -> str:
        """set of queued URLs that had no message at the last sweep (lost if still so at the next)."""
        return self._key("suspect")


class Ledger:
    """Reads and writes jobs; used by the producer (create, follow, report) and the task (transitions)."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.r = client
        self.ttl = ttl
        self._transition = client.register_script(_TRANSITION)
        self._renew = client.register_script(_RENEW)
        self._requeue = client.register_script(_REQUEUE)
        self._hold = client.register_script(_HOLD)
        self._cancel = client.register_script(_CANCEL)
        self._mark_queued = client.register_script(_MARK_QUEUED)
        self._uncancel = client.register_script(_UNCANCEL)

    # producer side ---------------------------------------------------------------------------------
    def create(self, job: str, meta: dict[str, Any], entries: Iterable[Row | tuple[int, str, str, str | None]]) -> int:
        """Write the job and its URLs (index, url, name, sha256, own options) before anything is published, so
        `resume` can finish it whatever happens to the producer. Returns the number of URLs."""
        k = JobKeys(job)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(k.meta, mapping={**{f"n:{s}": 0 for s in STATES}, "bytes": 0, "published": 0,
                                   **{m: json.dumps(v) for m, v in meta.items()}})
        pipe.expire(k.meta, self.ttl)
        pipe.zadd(JOBS_KEY, {job: time.time()})
        pipe.sadd(LIVE_KEY, job)
        pipe.zremrangebyscore(JOBS_KEY, 0, time.time() - self.ttl)
        total = 0
        for total, (i, url, name, digest, *own) in enumerate(entries, 1):  # own options: optional
            row = [url, name, digest, own[0]] if own and own[0] else [url, name, digest]
            pipe.hset(k.urls, str(i), json.dumps(row))
            if total % BATCH == 0:
                pipe.execute()
        pipe.expire(k.urls, self.ttl)
        pipe.hset(k.meta, "total", json.dumps(total))
        pipe.execute()
        return total

    def mark_queued(self, pipe: Any, job: str, indexes: list[int]) -> None:
        """Mark URLs queued, in the same transaction (`pipe`) that publishes their tasks; a URL that already has a
        state (a `cancel` while the job was being enqueued) keeps it."""
        k = JobKeys(job)
        self._mark_queued(keys=[k.meta, k.state], args=[self.ttl, *indexes], client=pipe)

    def cancel(self, job: str, total: int) -> int:
        """Stop a job: flag it (running URLs stop at their next chunk), cancel every URL not started yet and
        take the job off the live set. Returns the URLs cancelled here."""
        k = JobKeys(job)
        self.r.hset(k.meta, CANCELLED_AT, json.dumps(time.time()))
        n = 0
        for start in range(0, total, BATCH):
            n += int(self._cancel(keys=[k.meta, k.state, k.due],
                                  args=[self.ttl, *range(start, min(total, start + BATCH))]))
        return n

    def uncancel(self, job: str, total: int) -> int:
        """Take a cancelled job up again: its cancelled URLs become unpublished (what `resume` sends)."""
        k = JobKeys(job)
        n = 0
        for start in range(0, total, BATCH):
            n += int(self._uncancel(keys=[k.meta, k.state, k.rec], args=list(range(start, min(total, start + BATCH)))))
        self.r.hdel(k.meta, CANCELLED_AT)
        self.r.sadd(LIVE_KEY, job)
        return n

    def credentials(self, job: str) -> dict[str, Any] | None:
        """The job's netrc logins and cookies as the producer stored them (JSON), if any."""
        raw = self.r.hget(JobKeys(job).meta, CREDENTIALS)
        return json.loads(raw) if raw else None

    def feeding(self, job: str) -> tuple[int, int] | None:
        """(URLs offered to the broker so far, total) of a job fed through a window; None for one published whole."""
        fed, total = self.r.hmget(JobKeys(job).meta, [FED, "total"])
        return None if fed is None else (int(fed), int(total or 0))

    def fed(self, job: str, upto: int) -> None:
        self.r.hset(JobKeys(job).meta, FED, upto)

    def cancelled(self, job: str) -> bool:
        return bool(self.r.hexists(JobKeys(job).meta, CANCELLED_AT))

    def recent(self, limit: int) -> list[tuple[str, float]]:
        """(job, creation time) of the newest jobs, newest first."""
        found = self.r.zrevrange(JOBS_KEY, 0, limit - 1, withscores=True)
        return [(j.decode(), float(t)) for j, t in cast(list[tuple[bytes, float]], found)]

    def meta(self, job: str) -> dict[str, Any]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(JobKeys(job).meta))
        out: dict[str, Any] = {}
        for key, value in raw.items():
            k, v = key.decode(), value.decode()
            out[k] = int(v) if k.startswith("n:") or k in ("bytes", "published", FED) else json.loads(v)
        return out

    def counts(self, job: str) -> dict[str, int]:
        """All counters in one round-trip, however large the job; JobGone if the job is not there."""
        fields = [f"n:{s}" for s in STATES] + ["bytes", "published"]
        values = self.r.hmget(JobKeys(job).meta, fields)
        if all(v is None for v in values):
            raise JobGone(job)
        return {f.removeprefix("n:"): int(v or 0) for f, v in zip(fields, values, strict=True)}

    def unpublished(self, job: str, stop: int, start: int = 0) -> Iterator[Row]:
        """URLs of the job from `start` to `stop` that have no state yet: never published (`resume`, the feeder)."""
        k = JobKeys(job)
        for first in range(start, stop, BATCH):
            idx = list(range(first, min(stop, first + BATCH)))
            states = self.r.hmget(k.state, [str(i) for i in idx])
            missing = [i for i, s in zip(idx, states, strict=True) if s is None]
            if missing:
                rows = cast(list[bytes], self.r.hmget(k.urls, [str(i) for i in missing]))
                for i, raw in zip(missing, rows, strict=True):
                    yield (i, *_row(raw))

    def records(self, job: str, total: int) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        """(index, final record or None, state) for every URL, in input order, fetched in batches."""
        k = JobKeys(job)
        for start in range(0, total, BATCH):
            idx = [str(i) for i in range(start, min(total, start + BATCH))]
            pipe = self.r.pipeline(transaction=False)
            pipe.hmget(k.rec, idx)
            pipe.hmget(k.state, idx)
            pipe.hmget(k.urls, idx)
            recs, states, urls = pipe.execute()
            for i, rec, state, url in zip(idx, recs, states, urls, strict=True):
                status = (state or b"unpublished").decode()
                if rec:
                    record = expand(json.loads(rec), json.loads(url)[0] if url else "", status)
                elif url:
                    u, name, *_ = json.loads(url)
                    record = {"url": redact_url(u), "path": name, "status": status}
                else:
                    record = None
                yield int(i), record, state.decode() if state else None

    # task side -------------------------------------------------------------------------------------
    def transition(self, job: str, index: int, state: str, record: dict[str, Any] | None = None,
                   lease: float | None = None) -> str | None:
        """Move one URL to `state`; a non-final state holds a lease of `lease` seconds (see `renew`), a final
        state ends it. Returns the final state the URL already had (then nothing changed), or None."""
        k = JobKeys(job)
        payload = json.dumps(compact(record, state), separators=(",", ":")) if record is not None else ""
        nbytes = int(record.get("bytes") or 0) if record and state == DONE else 0
        due = "" if state in FINAL or lease is None else str(int(lease * 1000))
        old = self._transition(keys=[k.meta, k.state, k.rec, k.due],
                               args=[str(index), state, payload, nbytes, self.ttl, due])
        return old.decode() if old else None

    def hold(self, held: dict[str, list[int]], seconds: float) -> None:
        """Leases of `seconds` for URLs whose messages a live worker holds ({job: [index, ...]}), one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job, indexes in held.items():
            k = JobKeys(job)
            self._hold(keys=[k.state, k.due], args=[int(seconds * 1000), *indexes], client=pipe)
        pipe.execute()

    def renew(self, leases: dict[str, list[int]], seconds: float) -> None:
        """Extend the leases of running URLs ({job: [index, ...]}) to `seconds` from now, one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job, indexes in leases.items():
            self._renew(keys=[JobKeys(job).due], args=[int(seconds * 1000), *indexes], client=pipe)
        pipe.execute()

    def entry(self, job: str, index: int) -> tuple[str, str, str | None, dict[str, Any]] | None:
        """(url, name, sha256, own options) of one URL of the job, as the producer recorded it."""
        raw = self.r.hget(JobKeys(job).urls, str(index))
        return _row(raw) if raw else None

    def secret_headers(self, job: str, index: int) -> list[tuple[str, str]]:
        """The job's and the URL's secret headers (Authorization, Cookie...): kept here, never in a message."""
        k = JobKeys(job)
        meta, raw = self.r.hget(k.meta, SECRET_HEADERS), self.r.hget(k.urls, str(index))
        own = _row(raw)[3].get("headers", []) if raw else []
        return [(n, v) for n, v in (json.loads(meta) if meta else []) + own if is_secret_header(n)]

    # reconciler side -----------------------------------------------------------------------------
    def live(self) -> list[str]:
        return sorted(j.decode() for j in cast(set[bytes], self.r.smembers(LIVE_KEY)))

    def finished(self, job: str) -> None:
        self.r.srem(LIVE_KEY, job)

    def overdue(self, job: str, limit: int) -> list[int]:
        """URLs whose lease ran out (server time): their worker is gone, or their message was."""
        now_s, now_us = cast(tuple[int, int], self.r.time())
        found = self.r.zrangebyscore(JobKeys(job).due, "-inf", now_s * 1000 + now_us // 1000, start=0, num=limit)
        return [int(i) for i in cast(list[bytes], found)]

    def queued(self, job: str, limit: int) -> list[int]:
        """Up to `limit` URLs in state queued (a scan: used only when the queue is empty)."""
        found: list[int] = []
        for index, state in self.r.hscan_iter(JobKeys(job).state, count=1000):
            if state == QUEUED.encode():
                found.append(int(index))
                if len(found) >= limit:
                    break
        return found

    def in_state(self, job: str, indexes: list[int], state: str) -> list[int]:
        """Those of `indexes` whose URL is in `state` now."""
        if not indexes:
            return []
        states = self.r.hmget(JobKeys(job).state, [str(i) for i in indexes])
        return [i for i, s in zip(indexes, states, strict=True) if s == state.encode()]

    def without_lease(self, job: str, indexes: list[int]) -> set[int]:
        """Those of `indexes` that hold no lease (nothing is running, retrying or waiting for them)."""
        if not indexes:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for i in indexes:
            pipe.zscore(JobKeys(job).due, str(i))
        return {i for i, score in zip(indexes, pipe.execute(), strict=True) if score is None}

    def requeue(self, job: str, indexes: list[int]) -> dict[int, int]:
        """Put URLs that are not final back to queued; {index: redeliveries so far} of those moved."""
        if not indexes:
            return {}
        k = JobKeys(job)
        out = cast(list[int], self._requeue(keys=[k.meta, k.state, k.due, k.redelivered], args=indexes))
        return dict(zip(out[::2], out[1::2], strict=True))

    def record(self, job: str, index: int) -> dict[str, Any] | None:
        k = JobKeys(job)
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(k.rec, str(index))
        pipe.hget(k.urls, str(index))
        pipe.hget(k.state, str(index))
        raw, url, state = pipe.execute()
        if not raw:
            return None
        return expand(json.loads(raw), json.loads(url)[0] if url else "", (state or b"").decode())


def compact(record: dict[str, Any], state: str) -> dict[str, Any]:
    """The record as stored: without what the ledger knows already (the URL is in `urls`, the status in `state`,
    a final URL equal to the URL) and without empty fields. One record per URL: at 10^7 URLs each byte is 10 MB."""
    url = record.get("url")
    return {k: v for k, v in record.items() if v is not None and not (
        (k == "url") or (k == "status" and v == state) or (k == "final_url" and v == url)
        or (k, v) in _USUAL)}


def expand(stored: dict[str, Any], url: str, state: str) -> dict[str, Any]:
    """The record as `compact` stored it, whole again: URL (redacted), status, and the final URL of a download."""
    shown = redact_url(url)
    record: dict[str, Any] = {"url": shown, "status": state, "attempts": 1}
    if "sha256" in stored:  # a download's record
        record.update(final_url=shown, http_status=200)
    return record | stored


_USUAL = {("attempts", 1), ("http_status", 200)}  # left out of a stored record, put back by `expand`


def _row(raw: bytes | str) -> tuple[str, str, str | None, dict[str, Any]]:
    url, name, digest, *own = json.loads(raw)
    return url, name, digest, (own[0] if own else {})


_cache: dict[tuple[int, str], Ledger] = {}


def client_for(url: str, attempts: int = 12) -> redis.Redis:
    """A Redis client that rides out a restart of the server: about a minute of retries with backoff.
    Ledger writes are idempotent (the transition script ignores a repeated state), so replaying is safe."""
    retry = Retry(ExponentialBackoff(cap=10, base=0.2), attempts)
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30,
                                retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def for_url(url: str, ttl: int) -> Ledger:
    """A per-process ledger client (a forked pool child must not share its parent's sockets)."""
    key = (os.getpid(), url)
    if key not in _cache:
        _cache[key] = Ledger(client_for(url), ttl)
    return _cache[key]
