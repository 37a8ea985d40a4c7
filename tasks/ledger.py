"""The job ledger in Redis: the URLs of a job, each URL's state, its one final record, and counters.

Keys share the hash tag `{JOB}` (Redis Cluster keeps them on one node):
  ff:{JOB}:meta   hash   job settings + counters n:<state>, bytes, published
  ff:{JOB}:urls   hash   block (index // BLOCK) -> zlib of the block's rows, one JSON line each:
                         [url, name, sha256|null(, the URL's own options)]  (written once; what `resume` re-enqueues)
  ff:{JOB}:state  string one byte per URL, at its index: q s r d u f c (queued ... cancelled), NUL = no state yet
  ff:{JOB}:rec    hash   index -> final record, compact (`compact`): a download's packed (`pack`), others JSON
  ff:{JOB}:names  hash   worker names and content types of packed records <-> their small numbers
  ff:{JOB}:due    zset   index -> time (ms) by which a worker must be heard of again: the lease of a running URL,
                         the countdown of a retrying one (+ the lease); a final state removes it
  ff:jobs         zset   job id -> creation time
  ff:{JOB}:ended  (a channel, not a key) "1" is published when the job's last URL reaches its final state
State changes run as one Lua script, so counters always match the states and a URL gets at most one
final record, however many times its task is delivered. A done URL costs about 100 bytes of Redis: its state
byte, its share of a compressed block of URLs and a record of 49 bytes plus the hash's own entry.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from .connection import KernelTimeoutConnection, ScriptCall, together
from .message import is_secret_header
from .redact import redact_url

QUEUED, STARTED, RETRYING = "queued", "started", "retrying"
DONE, UNCHANGED, FAILED, CANCELLED = "done", "unchanged", "failed", "cancelled"
FINAL = (DONE, UNCHANGED, FAILED, CANCELLED)
STATES = (QUEUED, STARTED, RETRYING, *FINAL)
JOBS_KEY = "ff:jobs"
LIVE_KEY = "ff:live"  # set of jobs not finished yet: what the reconciler looks at
BATCH = 2000
BLOCK = 1000  # URLs per compressed block of `urls` (BATCH is a multiple: a batch reads whole blocks)
CANCELLED_AT = "cancelled"  # meta field: when `cancel` stopped the job (absent: not cancelled)
CREDENTIALS = "credentials"  # meta field: the job's netrc logins and cookies (tasks.credentials), read by workers
SECRET_HEADERS = "secret_headers"  # meta field: the job's secret headers (JSON pairs), read by the workers
FED = "fed"  # meta field: URLs below this index have been offered to the broker (feed.Feeder); absent: all were
Row = tuple[int, str, str, str | None, dict[str, Any]]  # index, url, name, sha256, the URL's own options

# Every script starts with this: the state byte of a URL (`code_at` is nil for a URL without a state).
_STATES = """
local NAME = {q='queued', s='started', r='retrying', d='done', u='unchanged', f='failed', c='cancelled'}
local CODE = {queued='q', started='s', retrying='r', done='d', unchanged='u', failed='f', cancelled='c'}
local FINAL = {d=true, u=true, f=true, c=true}
local function code_at(key, i)
  local b = redis.call('GETRANGE', key, i, i)
  if NAME[b] then return b end
  return nil
end
local function count(meta, code, n) redis.call('HINCRBY', meta, 'n:' .. NAME[code], n) end
-- After URLs reached a final state: once none is left, tell the job's followers on its channel (JobKeys.ended:
-- the meta key with 'ended' for 'meta'), so they report the end at once instead of at their next poll.
local function announce_if_ended(meta)
  local n = redis.call('HMGET', meta, 'total', 'n:done', 'n:unchanged', 'n:failed', 'n:cancelled')
  local left = tonumber(n[1])
  if not left then return end
  for i = 2, 5 do left = left - (tonumber(n[i]) or 0) end
  if left <= 0 then redis.call('PUBLISH', string.sub(meta, 1, -5) .. 'ended', '1') end
end
"""

# KEYS[1] meta, KEYS[2] state, KEYS[3] rec, KEYS[4] due
# ARGV[1] index, ARGV[2] new state, ARGV[3] final record ('' = none), ARGV[4] bytes to count, ARGV[5] ttl (s),
# ARGV[6] ms from now by which a worker must be heard of again for this URL (its lease); '' = none (final)
# A URL without a state yet counts as published (`published` = URLs that have a state): its message was taken
# before the publisher marked it queued (mark_queued then leaves it).
# Returns the final state the URL already had (then nothing changes), or false. A URL about to start in a job
# that was cancelled (meta field `cancelled`) ends cancelled instead, and 'cancelled' is returned: the worker
# skips it in the same round trip.
_TRANSITION = _STATES + """
local i = tonumber(ARGV[1])
local old = code_at(KEYS[2], i)
if old and FINAL[old] then return NAME[old] end
if not old then redis.call('HINCRBY', KEYS[1], 'published', 1) end
local new = CODE[ARGV[2]]
if new == 's' and redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
  redis.call('SETRANGE', KEYS[2], i, 'c')
  if old then count(KEYS[1], old, -1) end
  count(KEYS[1], 'c', 1)
  redis.call('ZREM', KEYS[4], ARGV[1])
  announce_if_ended(KEYS[1])
  return 'cancelled'
end
if old ~= new then
  redis.call('SETRANGE', KEYS[2], i, new)
  if old then count(KEYS[1], old, -1) end
  count(KEYS[1], new, 1)
  if FINAL[new] then announce_if_ended(KEYS[1]) end
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

# KEYS[1] names; ARGV[1] 'w:<worker>' or 'c:<content type>', ARGV[2] the value, ARGV[3] ttl (s)
# The small number of a worker name or content type in this job (given once, kept: `pack` stores numbers).
_INTERN = """
local c = redis.call('HGET', KEYS[1], ARGV[1])
if c then return tonumber(c) end
c = redis.call('HINCRBY', KEYS[1], '#', 1)
redis.call('HSET', KEYS[1], ARGV[1], c, '#' .. c, ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return c
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
_HOLD = _STATES + """
local t = redis.call('TIME')
local at = t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  local s = code_at(KEYS[1], tonumber(ARGV[i]))
  if not (s and FINAL[s]) then redis.call('ZADD', KEYS[2], at, ARGV[i]) end
end
return 0
"""

# KEYS[1] meta, KEYS[2] state, KEYS[3] due, KEYS[4] redelivered; ARGV[1..] indexes
# Each URL not final goes back to queued (counters kept), loses its lease and counts one more redelivery.
# Returns {index, redeliveries, ...} for the URLs moved.
_REQUEUE = _STATES + """
local out = {}
for i = 1, #ARGV do
  local old = code_at(KEYS[2], tonumber(ARGV[i]))
  redis.call('ZREM', KEYS[3], ARGV[i])
  if not (old and FINAL[old]) then
    if old ~= 'q' then
      redis.call('SETRANGE', KEYS[2], tonumber(ARGV[i]), 'q')
      if old then count(KEYS[1], old, -1) end
      count(KEYS[1], 'q', 1)
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
_MARK_QUEUED = _STATES + """
local n = 0
for i = 2, #ARGV do
  local at = tonumber(ARGV[i])
  if not code_at(KEYS[2], at) then
    redis.call('SETRANGE', KEYS[2], at, 'q')
    n = n + 1
  end
end
redis.call('HINCRBY', KEYS[1], 'n:queued', n)
redis.call('HINCRBY', KEYS[1], 'published', n)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return n
"""

# KEYS[1] meta, KEYS[2] state, KEYS[3] due; ARGV[1] ttl (s), ARGV[2] when the job was cancelled ('' = flagged
# already), ARGV[3..] indexes
# Flags the job (a URL about to start then ends cancelled instead, a running one stops at its next chunk) in the same
# step as each URL not started and not final (never published, queued, retrying) becomes cancelled: none starts in
# between. A URL never published counts as published (published = URLs that have a state). Started ones are left to
# their worker. Returns the count.
_CANCEL = _STATES + """
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'cancelled', ARGV[2]) end
local n = 0
for i = 3, #ARGV do
  local at = tonumber(ARGV[i])
  local old = code_at(KEYS[2], at)
  if not old or old == 'q' or old == 'r' then
    redis.call('SETRANGE', KEYS[2], at, 'c')
    if old then count(KEYS[1], old, -1) else redis.call('HINCRBY', KEYS[1], 'published', 1) end
    count(KEYS[1], 'c', 1)
    redis.call('ZREM', KEYS[3], ARGV[i])
    n = n + 1
  end
end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
if n > 0 then announce_if_ended(KEYS[1]) end
return n
"""

# KEYS[1] meta, KEYS[2] state, KEYS[3] rec; ARGV[1..] indexes
# Each cancelled URL goes back to "never published" (no state, no record), for `resume`. Returns the count.
_UNCANCEL = _STATES + """
local n = 0
for i = 1, #ARGV do
  local at = tonumber(ARGV[i])
  if code_at(KEYS[2], at) == 'c' then
    redis.call('SETRANGE', KEYS[2], at, string.char(0))
    redis.call('HDEL', KEYS[3], ARGV[i])
    count(KEYS[1], 'c', -1)
    redis.call('HINCRBY', KEYS[1], 'published', -1)
    n = n + 1
  end
end
return n
"""
_NAMES = {b"q": QUEUED, b"s": STARTED, b"r": RETRYING, b"d": DONE, b"u": UNCHANGED, b"f": FAILED, b"c": CANCELLED}


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
    def names(self) -> str:
        """hash 'w:<worker>' / 'c:<content type>' -> number, '#<number>' -> the name (packed records use numbers)."""
        return self._key("names")

    @property
    def due(self) -> str:
        """zset index -> server time (ms) by which a worker must be heard of again for a non-final URL."""
        return self._key("due")

    @property
    def ended(self) -> str:
        """The channel on which the ledger's scripts publish when the job's last URL has ended (not a key)."""
        return self._key("ended")

    @property
    def redelivered(self) -> str:
        """hash index -> times the reconciler published the URL again."""
        return self._key("redelivered")

    @property
    def flight(self) -> str:
        """hash index -> "BYTES [SIZE]": a running download's bytes so far (and its size, when announced), as its
        worker last published them (`Ledger.running`), for the producer's progress."""
        return self._key("flight")

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
        self._intern = client.register_script(_INTERN)
        self._numbers: dict[tuple[str, str], int] = {}  # (job, 'w:<worker>' ...) -> its number in the job
        self._block: tuple[tuple[str, int], list[bytes]] | None = None  # the block of URLs read last (`entry`)

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
        total, rows = 0, list[bytes]()
        for total, (i, url, name, digest, *own) in enumerate(entries, 1):  # own options: optional
            if i != total - 1:
                raise ValueError(f"URL index {i} out of order: the ledger stores URLs in blocks by index")
            row = [url, name, digest, own[0]] if own and own[0] else [url, name, digest]
            rows.append(json.dumps(row, separators=(",", ":")).encode())
            if len(rows) == BLOCK:
                pipe.hset(k.urls, str(i // BLOCK), zlib.compress(b"\n".join(rows)))
                rows.clear()
                if total % (BLOCK * 20) == 0:
                    pipe.execute()
        if rows:
            pipe.hset(k.urls, str((total - 1) // BLOCK), zlib.compress(b"\n".join(rows)))
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
        n = 0
        for start in range(0, max(total, 1), BATCH):  # the flag with the first batch (also of a job with no URL)
            flag = json.dumps(time.time()) if start == 0 else ""
            n += int(self._cancel(keys=[k.meta, k.state, k.due],
                                  args=[self.ttl, flag, *range(start, min(total, start + BATCH))]))
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

    def options(self, job: str) -> dict[str, Any] | None:
        """The options the producer recorded for the job (`Options.changed()`); None if the job is not there."""
        opts, total = self.r.hmget(JobKeys(job).meta, ["opts", "total"])
        if total is None:
            return None
        return cast(dict[str, Any], json.loads(opts)) if opts else {}

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
        values = self.r.hmget(JobKeys(job).meta, COUNTERS)
        if all(v is None for v in values):
            raise JobGone(job)
        return counts_in(dict(zip(COUNTERS, values, strict=True)))

    def states(self, job: str, start: int, stop: int) -> list[str | None]:
        """The state of each URL from `start` to `stop` (None: no state yet), from one read of the state bytes."""
        raw = cast(bytes, self.r.getrange(JobKeys(job).state, start, stop - 1)) if stop > start else b""
        return [_NAMES.get(raw[j:j + 1]) for j in range(stop - start)]

    def state(self, job: str, index: int) -> str | None:
        return self.states(job, index, index + 1)[0]

    def end_of(self, job: str) -> EndWatch:
        """What a follower of the job waits on between two looks at its counters (`EndWatch`)."""
        return EndWatch(self.r, JobKeys(job).ended)

    def _rows(self, job: str, start: int, stop: int) -> list[bytes | None]:
        """The stored rows (JSON) of URLs `start` to `stop`, from the blocks that hold them."""
        blocks = list(range(start // BLOCK, (stop - 1) // BLOCK + 1)) if stop > start else []
        raw = cast(list[bytes | None], self.r.hmget(JobKeys(job).urls, [str(b) for b in blocks])) if blocks else []
        rows: list[bytes | None] = []
        for b, packed in zip(blocks, raw, strict=True):
            lines = _block_rows(packed)
            rows.extend(lines + [None] * (BLOCK - len(lines)) if b < blocks[-1] else lines)
        offset = start - blocks[0] * BLOCK if blocks else 0
        found = rows[offset:offset + stop - start]
        return found + [None] * (stop - start - len(found))

    def unpublished(self, job: str, stop: int, start: int = 0) -> Iterator[Row]:
        """URLs of the job from `start` to `stop` that have no state yet: never published (`resume`, the feeder)."""
        for first in range(start, stop, BATCH):
            last = min(stop, first + BATCH)
            states = self.states(job, first, last)
            if any(s is None for s in states):
                for i, s, raw in zip(range(first, last), states, self._rows(job, first, last), strict=True):
                    if s is None and raw:
                        yield (i, *_row(raw))

    def records(self, job: str, total: int) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        """(index, final record or None, state) for every URL, in input order, fetched in batches."""
        k = JobKeys(job)
        names = self._names(job)
        for start in range(0, total, BATCH):
            stop = min(total, start + BATCH)
            recs = cast(list[bytes | None], self.r.hmget(k.rec, [str(i) for i in range(start, stop)]))
            states, rows = self.states(job, start, stop), self._rows(job, start, stop)
            for i, rec, state, row in zip(range(start, stop), recs, states, rows, strict=True):
                url, name = _row(row)[:2] if row else ("", "")
                if rec:
                    record = expand(unpack(rec, names), url, state or "", name)
                elif row:
                    record = {"url": redact_url(url), "path": name, "status": state or "unpublished"}
                else:
                    record = None
                yield i, record, state

    # task side -------------------------------------------------------------------------------------
    def transition(self, job: str, index: int, state: str, record: dict[str, Any] | None = None,
                   lease: float | None = None, name: str | None = None, then: ScriptCall | None = None) -> str | None:
        """Move one URL to `state`; a non-final state holds a lease of `lease` seconds (see `renew`), a final
        state ends it. `name`: the URL's file name in the ledger (a record's path equal to it is not stored).
        `then`: an idempotent script to run right after, in the same round trip (`together`): the download's
        host slot given back. Returns the final state the URL already had (then nothing changed), or None."""
        k = JobKeys(job)
        payload = b"" if record is None else pack(compact(record, state, name), functools.partial(self._number, job))
        nbytes = int(record.get("bytes") or 0) if record and state == DONE else 0
        due = "" if state in FINAL or lease is None else str(int(lease * 1000))
        keys = [k.meta, k.state, k.rec, k.due]
        args: list[str | bytes | int] = [str(index), state, payload, nbytes, self.ttl, due]
        if then is None:
            old = self._transition(keys=keys, args=args)
        else:
            old = together(self.r, [(self._transition, keys, args), then])[0]
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

    def _number(self, job: str, kind: str, value: str) -> int:
        """The number of a worker name ('w') or content type ('c') in the job, asked of Redis once per process."""
        key = (job, f"{kind}:{value}")
        if key not in self._numbers:
            if len(self._numbers) > 10_000:
                self._numbers.clear()
            self._numbers[key] = int(self._intern(keys=[JobKeys(job).names], args=[key[1], value, self.ttl]))
        return self._numbers[key]

    def _names(self, job: str) -> dict[int, str]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(JobKeys(job).names))
        return {int(k[1:]): v.decode() for k, v in raw.items() if k.startswith(b"#") and len(k) > 1}

    def entry(self, job: str, index: int) -> tuple[str, str, str | None, dict[str, Any]] | None:
        """(url, name, sha256, own options) of one URL of the job, as the producer recorded it. Workers read
        a URL's entry only for its secrets; the last block read is kept (URLs run about in order)."""
        where = (job, index // BLOCK)
        cached = self._block
        if cached is None or cached[0] != where:
            packed = cast(bytes | None, self.r.hget(JobKeys(job).urls, str(where[1])))
            cached = (where, _block_rows(packed))
            self._block = cached
        rows = cached[1]
        return _row(rows[index % BLOCK]) if index % BLOCK < len(rows) else None

    def secret_headers(self, job: str, index: int) -> list[tuple[str, str]]:
        """The job's and the URL's secret headers (Authorization, Cookie...): kept here, never in a message."""
        meta, found = self.r.hget(JobKeys(job).meta, SECRET_HEADERS), self.entry(job, index)
        own = found[3].get("headers", []) if found else []
        return [(n, v) for n, v in (json.loads(meta) if meta else []) + own if is_secret_header(n)]

    def running(self, job: str, index: int, size: int, expected: int | None) -> bool:
        """Publish a running download's bytes so far (and its size if known) for the producer's progress; whether
        the job was cancelled meanwhile, in the same round trip."""
        k = JobKeys(job)
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(k.flight, str(index), f"{size} {'' if expected is None else expected}".strip())
        pipe.expire(k.flight, self.ttl)
        pipe.hexists(k.meta, CANCELLED_AT)
        return bool(pipe.execute()[2])

    def landed(self, job: str, index: int) -> None:
        """The download whose bytes `running` published is over (done, failed or to be retried)."""
        self.r.hdel(JobKeys(job).flight, str(index))

    def in_flight(self, job: str) -> tuple[int, int | None]:
        """(bytes so far of the job's running downloads, the size they will have in all: None when one did not
        announce it). Entries of URLs no longer started (their worker was killed) do not count."""
        raw = cast(dict[bytes, bytes], self.r.hgetall(JobKeys(job).flight))
        if not raw:
            return 0, 0
        live = set(self.in_state(job, [int(i) for i in raw], STARTED))
        done, expected = 0, 0
        unknown = False
        for index, value in raw.items():
            if int(index) in live:
                size, _, total = value.decode().partition(" ")
                done += int(size)
                expected += int(total or 0)
                unknown = unknown or not total
        return done, None if unknown else expected

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
        """Up to `limit` URLs in state queued (a scan of the state bytes: used only when the queue is empty)."""
        found: list[int] = []
        key, chunk, start = JobKeys(job).state, 1 << 20, 0
        while len(found) < limit:
            raw = cast(bytes, self.r.getrange(key, start, start + chunk - 1))
            found.extend(start + m.start() for m in re.finditer(b"q", raw))
            if len(raw) < chunk:
                break
            start += chunk
        return found[:limit]

    def in_state(self, job: str, indexes: list[int], state: str) -> list[int]:
        """Those of `indexes` whose URL is in `state` now."""
        if not indexes:
            return []
        pipe = self.r.pipeline(transaction=False)
        for i in indexes:
            pipe.getrange(JobKeys(job).state, i, i)
        return [i for i, s in zip(indexes, pipe.execute(), strict=True) if _NAMES.get(s) == state]

    def without_lease(self, job: str, indexes: list[int]) -> set[int]:
        """Those of `indexes` that hold no lease (nothing is running, retrying or waiting for them)."""
        if not indexes:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for i in indexes:
            pipe.zscore(JobKeys(job).due, str(i))
        return {i for i, score in zip(indexes, pipe.execute(), strict=True) if score is None}

    def release_started(self, job: str) -> int:
        """URLs marked started go back to queued, without a lease: only for a caller that knows their worker is gone
        and their message is back in the queue (local mode, holding its directory's lock). Returns how many."""
        held = [int(i) for i in cast(list[bytes], self.r.zrange(JobKeys(job).due, 0, -1))]
        started = self.in_state(job, held, STARTED)
        for index in started:
            self.transition(job, index, QUEUED)
        return len(started)

    def requeue(self, job: str, indexes: list[int]) -> dict[int, int]:
        """Put URLs that are not final back to queued; {index: redeliveries so far} of those moved."""
        if not indexes:
            return {}
        k = JobKeys(job)
        out = cast(list[int], self._requeue(keys=[k.meta, k.state, k.due, k.redelivered], args=indexes))
        return dict(zip(out[::2], out[1::2], strict=True))

    def record(self, job: str, index: int) -> dict[str, Any] | None:
        raw = cast(bytes | None, self.r.hget(JobKeys(job).rec, str(index)))
        if not raw:
            return None
        row = self._rows(job, index, index + 1)[0]
        url, name = _row(row)[:2] if row else ("", "")
        return expand(unpack(raw, self._names(job)), url, self.state(job, index) or "", name)


COUNTERS = [f"n:{s}" for s in STATES] + ["bytes", "published"]  # meta fields kept by the Lua scripts


class EndWatch:
    """A wait that ends early when the job's last URL ends: the ledger's scripts publish on the job's `ended`
    channel then (`announce_if_ended`), so its follower reports the end at once instead of at its next poll of
    the counters (up to 0.1 s later). The subscription has a connection of its own that does not retry: while
    the server is away, a wait just sleeps its time, and the follower's look at the counters says what is wrong.
    A message missed (published before the subscription) costs one poll interval, nothing more."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs, retry=Retry(NoBackoff(), 0))
        self._client = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs))
        self.channel = channel
        self._sub: redis.client.PubSub | None = None

    def wait(self, seconds: float) -> bool:
        """Up to `seconds`; True if the job's end was announced meanwhile."""
        deadline = time.monotonic() + seconds
        try:
            if self._sub is None:
                self._sub = self._client.pubsub(ignore_subscribe_messages=True)
                self._sub.subscribe(self.channel)
            while (left := deadline - time.monotonic()) > 0:
                if self._sub.get_message(timeout=left) is not None:
                    return True
        except (redis.RedisError, OSError):
            self.close()
            time.sleep(max(0.0, deadline - time.monotonic()))
        return False

    def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._sub.close()
            self._sub = None
        self._client.connection_pool.disconnect()

    def __enter__(self) -> EndWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def counts_in(meta: dict[str, Any]) -> dict[str, int]:
    """The counters of a job from its meta fields (`meta` or `counts`): state -> URLs, bytes, published."""
    return {f.removeprefix("n:"): int(meta.get(f) or 0) for f in COUNTERS}


def compact(record: dict[str, Any], state: str, name: str | None = None) -> dict[str, Any]:
    """The record as stored: without what the ledger knows already (the URL is in `urls`, the status in `state`,
    a final URL equal to the URL, a path equal to the URL's name) and without empty fields. One record per URL:
    at 10^7 URLs each byte is 10 MB."""
    url = record.get("url")
    return {k: v for k, v in record.items() if v is not None and not (
        (k == "url") or (k == "status" and v == state) or (k == "final_url" and v == url)
        or (k == "path" and v == name) or (k, v) in _USUAL)}


def expand(stored: dict[str, Any], url: str, state: str, name: str = "") -> dict[str, Any]:
    """The record as `compact` stored it, whole again: URL (redacted), status, path (every record has one: where the
    file is or would have been), and the final URL of a download."""
    shown = redact_url(url)
    record: dict[str, Any] = {"url": shown, "status": state, "attempts": 1, **({"path": name} if name else {})}
    if "sha256" in stored:  # a download's record
        record.update(final_url=shown, http_status=200)
    return record | stored


_USUAL = {("attempts", 1), ("http_status", 200)}  # left out of a stored record, put back by `expand`

# A download's record packed: a marker (JSON never starts with it), the numbers of its worker and content type
# (0: none) in the job's `names`, elapsed ms (NO_MS: none), bytes and the SHA-256 itself; any other field follows
# as JSON. 49 bytes where the JSON was ~200.
PACKED = struct.Struct(">cHHIQ32s")
MARK, NO_MS = b"\x01", 0xFFFFFFFF
_HEX64 = re.compile(r"[0-9a-f]{64}")


def pack(stored: dict[str, Any], number: Callable[[str, str], int]) -> bytes:
    """A compact record as stored: packed when it is a download's (`number(kind, value)` numbers names), JSON
    otherwise."""
    sha, size, worker = stored.get("sha256"), stored.get("bytes"), stored.get("worker")
    ms = round(stored["elapsed_s"] * 1000) if isinstance(stored.get("elapsed_s"), int | float) else NO_MS
    if (not isinstance(sha, str) or not _HEX64.fullmatch(sha) or not isinstance(size, int) or not 0 <= size < 2**64
            or not isinstance(worker, str) or not 0 <= ms <= NO_MS):
        return json.dumps(stored, separators=(",", ":")).encode()
    ctype = stored.get("content_type")
    w, c = number("w", worker), number("c", ctype) if isinstance(ctype, str) else 0
    if w > 0xFFFF or c > 0xFFFF:  # more names in one job than the numbers hold: JSON then
        return json.dumps(stored, separators=(",", ":")).encode()
    rest = {k: v for k, v in stored.items() if k not in ("sha256", "bytes", "worker", "elapsed_s")
            and not (k == "content_type" and c)}
    tail = json.dumps(rest, separators=(",", ":")).encode() if rest else b""
    return PACKED.pack(MARK, w, c, ms, size, bytes.fromhex(sha)) + tail


def unpack(raw: bytes, names: dict[int, str]) -> dict[str, Any]:
    """A stored record (`pack`) as a dict; `names`: the job's numbered names."""
    if raw[:1] != MARK:
        return cast(dict[str, Any], json.loads(raw))
    _, w, c, ms, size, sha = PACKED.unpack_from(raw)
    out: dict[str, Any] = {"worker": names.get(w, "?"), "bytes": size, "sha256": sha.hex()}
    if ms != NO_MS:
        out["elapsed_s"] = ms / 1000
    if c:
        out["content_type"] = names.get(c, "?")
    if len(raw) > PACKED.size:
        out.update(json.loads(raw[PACKED.size:]))
    return out


def _block_rows(packed: bytes | None) -> list[bytes]:
    """The stored rows (JSON lines) of one block of `urls`; none for a block that is not there."""
    return zlib.decompress(packed).split(b"\n") if packed else []


def _row(raw: bytes | str) -> tuple[str, str, str | None, dict[str, Any]]:
    url, name, digest, *own = json.loads(raw)
    return url, name, digest, (own[0] if own else {})


_own = threading.local()  # this thread's ledgers (`for_thread`)


def client_for(url: str, attempts: int = 12, own_connection: bool = False, timeout: float = 30) -> redis.Redis:
    """A Redis client that rides out a restart of the server: about a minute of retries with backoff.
    Ledger writes are idempotent (the transition script ignores a repeated state), so replaying is safe.
    `own_connection`: the client keeps one connection for itself (connected now) instead of taking one from its
    pool for each command; it must then serve one thread only. `timeout`: how long a read or a write may wait
    for the server before the call fails (and is retried)."""
    retry = Retry(ExponentialBackoff(cap=10, base=0.2), attempts)
    # A thread's own connection waits for Redis without polling first (tasks/connection.py).
    plain = own_connection and url.startswith("redis://")
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=5, health_check_interval=30,
                                retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                single_connection_client=own_connection,
                                **({"connection_class": KernelTimeoutConnection} if plain else {}))


def for_thread(url: str, ttl: int) -> Ledger:
    """This thread's ledger, on a Redis connection of its own: what a download task uses. A pooled client checks
    each connection it hands out for unread data (two ioctl and a recv, each letting go of the GIL) and gives it
    back after every command; a task sends four scripts per URL from one thread, and a pool of 32 threads grows
    to 32 connections either way. Keyed by process too: a forked child inherits its parent's thread-locals."""
    key = (os.getpid(), url)
    mine: dict[tuple[int, str], Ledger] = _own.__dict__.setdefault("ledgers", {})
    if key not in mine:
        mine[key] = Ledger(client_for(url, own_connection=True), ttl)
    return mine[key]
