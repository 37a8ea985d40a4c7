"""The job ledger in Redis: the URLs of a job, each URL's state, its one final record, and counters.

Keys share the hash tag `{JOB}` (Redis Cluster keeps them on one node):
  ff:{JOB}:meta   hash   job settings + counters n:<state>, bytes, published
  ff:{JOB}:urls   hash   index -> [url, name, sha256|null]           (what `resume` re-enqueues)
  ff:{JOB}:state  hash   index -> state
  ff:{JOB}:rec    hash   index -> final record (JSON)
  ff:jobs         zset   job id -> creation time
State changes run as one Lua script, so counters always match the states and a URL gets at most one
final record, however many times its task is delivered.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

QUEUED, STARTED, RETRYING = "queued", "started", "retrying"
DONE, UNCHANGED, FAILED = "done", "unchanged", "failed"
FINAL = (DONE, UNCHANGED, FAILED)
STATES = (QUEUED, STARTED, RETRYING, *FINAL)
JOBS_KEY = "ff:jobs"
BATCH = 2000

_TRANSITION = """
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old == 'done' or old == 'unchanged' or old == 'failed' then return old end
if old ~= ARGV[2] then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  if old then redis.call('HINCRBY', KEYS[1], 'n:' .. old, -1) end
  redis.call('HINCRBY', KEYS[1], 'n:' .. ARGV[2], 1)
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'bytes', tonumber(ARGV[4]))
end
if redis.call('TTL', KEYS[3]) < 0 then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], tonumber(ARGV[5])) end
end
return false
"""


def keys(job: str) -> dict[str, str]:
    return {k: f"ff:{{{job}}}:{k}" for k in ("meta", "urls", "state", "rec")}


class Ledger:
    """Reads and writes jobs; used by the producer (create, follow, report) and the task (transitions)."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.r = client
        self.ttl = ttl
        self._transition = client.register_script(_TRANSITION)

    # producer side ---------------------------------------------------------------------------------
    def create(self, job: str, meta: dict[str, Any]) -> None:
        k = keys(job)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(k["meta"], mapping={**{f"n:{s}": 0 for s in STATES}, "bytes": 0, "published": 0,
                                      **{m: json.dumps(v) for m, v in meta.items()}})
        pipe.expire(k["meta"], self.ttl)
        pipe.zadd(JOBS_KEY, {job: time.time()})
        pipe.zremrangebyscore(JOBS_KEY, 0, time.time() - self.ttl)
        pipe.execute()

    def add_urls(self, job: str, entries: Iterable[tuple[int, str, str, str | None]]) -> None:
        """Record the job's URLs (index, url, name, sha256) before anything is published."""
        k = keys(job)
        pipe = self.r.pipeline(transaction=False)
        for n, (i, url, name, digest) in enumerate(entries, 1):
            pipe.hset(k["urls"], str(i), json.dumps([url, name, digest]))
            if n % BATCH == 0:
                pipe.execute()
        pipe.expire(k["urls"], self.ttl)
        pipe.execute()

    def queued_pipeline_ops(self, pipe: Any, job: str, indexes: list[int]) -> None:
        """Mark URLs queued, in the same transaction that publishes their tasks."""
        k = keys(job)
        pipe.hset(k["state"], mapping={str(i): QUEUED for i in indexes})
        pipe.hincrby(k["meta"], f"n:{QUEUED}", len(indexes))
        pipe.hincrby(k["meta"], "published", len(indexes))
        pipe.expire(k["state"], self.ttl)

    def meta(self, job: str) -> dict[str, Any]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(keys(job)["meta"]))
        out: dict[str, Any] = {}
        for key, value in raw.items():
            k, v = key.decode(), value.decode()
            out[k] = int(v) if k.startswith("n:") or k in ("bytes", "published") else json.loads(v)
        return out

    def counts(self, job: str) -> dict[str, int]:
        """All counters in one round-trip, however large the job."""
        fields = [f"n:{s}" for s in STATES] + ["bytes", "published"]
        values = self.r.hmget(keys(job)["meta"], fields)
        return {f.removeprefix("n:"): int(v or 0) for f, v in zip(fields, values, strict=True)}

    def unpublished(self, job: str, total: int) -> Iterator[tuple[int, str, str, str | None]]:
        """URLs of the job that have no state yet: never published (for `resume`)."""
        k = keys(job)
        for start in range(0, total, BATCH):
            idx = list(range(start, min(total, start + BATCH)))
            states = self.r.hmget(k["state"], [str(i) for i in idx])
            missing = [i for i, s in zip(idx, states, strict=True) if s is None]
            if missing:
                rows = cast(list[bytes], self.r.hmget(k["urls"], [str(i) for i in missing]))
                for i, raw in zip(missing, rows, strict=True):
                    url, name, digest = json.loads(raw)
                    yield i, url, name, digest

    def records(self, job: str, total: int) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        """(index, final record or None, state) for every URL, in input order, fetched in batches."""
        k = keys(job)
        for start in range(0, total, BATCH):
            idx = [str(i) for i in range(start, min(total, start + BATCH))]
            pipe = self.r.pipeline(transaction=False)
            pipe.hmget(k["rec"], idx)
            pipe.hmget(k["state"], idx)
            pipe.hmget(k["urls"], idx)
            recs, states, urls = pipe.execute()
            for i, rec, state, url in zip(idx, recs, states, urls, strict=True):
                record = json.loads(rec) if rec else None
                if record is None and url:
                    u, name, _ = json.loads(url)
                    record = {"url": u, "path": name, "status": (state or b"unpublished").decode()}
                yield int(i), record, state.decode() if state else None

    # task side -------------------------------------------------------------------------------------
    def transition(self, job: str, index: int, state: str, record: dict[str, Any] | None = None) -> str | None:
        """Move one URL to `state`. Returns the final state it already had (then nothing changed), or None."""
        k = keys(job)
        payload = json.dumps(record, separators=(",", ":")) if record is not None else ""
        nbytes = int(record.get("bytes") or 0) if record and state == DONE else 0
        old = self._transition(keys=[k["meta"], k["state"], k["rec"]],
                               args=[str(index), state, payload, nbytes, self.ttl])
        return old.decode() if old else None

    def record(self, job: str, index: int) -> dict[str, Any] | None:
        raw = self.r.hget(keys(job)["rec"], str(index))
        return json.loads(raw) if raw else None


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
