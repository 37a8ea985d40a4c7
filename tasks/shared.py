"""One big file's pieces spread over the workers that share the download volume (FLEETFETCH_SHARED_VOLUME=1).

The URL's task (the owner) preallocates the locked temp file, records its pieces here and publishes helper tasks
(tasks/helper.py). Every participant, the owner included, claims an unfinished piece with a lease (one script
run), fetches it with Range and If-Range into the temp file at its offset and marks it done. A piece whose lease
lapsed (its worker died) is claimed again. The owner hashes the file in order, waits for every piece, verifies
and renames it, and writes the URL's one record. Keys, with the job's expiry:

  ff:{JOB}:seg:INDEX        hash  gen (the plan's generation), plan (JSON: the file, its size and validator,
                                  the pieces), bad (why a participant refused the server's ranges)
  ff:{JOB}:seg:INDEX:lease  zset  piece -> when its claim lapses (ms, the server's clock)
  ff:{JOB}:seg:INDEX:done   hash  piece -> who fetched it ("worker task-id", the owner's "worker task-id/thread")
  ff:{JOB}:seg:INDEX:todo   list  pieces never claimed (or given back), in order
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import cast

import redis

SEGMENT_TASK = "fleetfetch.segment"  # the helper task's name
DONE, GONE, BUSY = -1, -2, -3  # a claim's answers besides a piece: all done; plan gone or refused; all claimed

# Every key lives as long as the plan (the job's expiry), also one a script creates anew (a list or set emptied).
_KEEP = """
local function keep(key)
  local ttl = redis.call('TTL', KEYS[1])
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
"""

# KEYS: the plan, lease, done, todo. ARGV[1] gen, ARGV[2] lease ms. A lapsed claim first (its worker died), then the
# next piece never claimed: a few commands whatever the number of pieces.
_CLAIM = _KEEP + """
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] or redis.call('HEXISTS', KEYS[1], 'bad') == 1 then return -2 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local piece = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1)[1] or redis.call('LPOP', KEYS[4])
if piece then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), piece)
  keep(KEYS[2])
  return tonumber(piece)
end
if redis.call('ZCARD', KEYS[2]) > 0 then return -3 end
return -1
"""

# ARGV[1] gen, ARGV[2] piece, ARGV[3] who fetched it ('' = not fetched: give the claim back), ARGV[4] lease ms
# (renew the claim; '' = not a renewal)
_MARK = _KEEP + """
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[1] then return 0 end
if ARGV[4] ~= '' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'XX', t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[4]), ARGV[2])
  return 1
end
local leased = redis.call('ZREM', KEYS[2], ARGV[2]) == 1
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[3], ARGV[2], ARGV[3])
  keep(KEYS[3])
elseif leased and redis.call('HEXISTS', KEYS[3], ARGV[2]) == 0 then
  redis.call('LPUSH', KEYS[4], ARGV[2])
  keep(KEYS[4])
end
return 1
"""


@dataclass
class Plan:
    """What a helper needs to join: the temp file (by its directory, name and inode), the file's version, the
    pieces."""

    gen: str
    url: str  # storage.url_key of the URL
    size: int
    validator: str
    subdir: str
    part: str  # the temp file's name in its directory
    inode: int
    pieces: list[list[int]]
    kept: list[list[int]]  # ranges complete before the plan (the first stream's start, a resumed map's)


@dataclass
class Shared:
    """The owner's side: its board, who it is in the record, and how to publish helper tasks."""

    board: Board
    who: str  # "worker-hostname task-id"
    subdir: str
    helpers: Callable[[str, int], None]  # publish this many helper tasks for the plan of this generation
    lease_s: float  # a claim lapses after this long without renewal
    renewed: float = 0.0
    published: float = 0.0  # when the plan was published or taken over (monotonic)


class Board:
    """The pieces of one job's URL in Redis. `client()` gives the calling thread's Redis client."""

    def __init__(self, client: Callable[[], redis.Redis], job: str, index: int, ttl: int, lease_s: float) -> None:
        self.client, self.ttl, self.lease_ms = client, ttl, int(lease_s * 1000)
        base = f"ff:{{{job}}}:seg:{index}"
        self.keys = [base, f"{base}:lease", f"{base}:done", f"{base}:todo"]
        r = client()
        self._claim, self._mark = r.register_script(_CLAIM), r.register_script(_MARK)

    def publish(self, plan: Plan, done: dict[int, str], held: list[int]) -> None:
        """Record a new plan (any older one and its claims go): pieces `done` already, `held` claimed by the
        caller."""
        pipe = self.client().pipeline(transaction=True)
        pipe.delete(*self.keys)
        pipe.hset(self.keys[0], mapping={"gen": plan.gen, "n": len(plan.pieces), "plan": json.dumps(asdict(plan))})
        if done:
            pipe.hset(self.keys[2], mapping={str(i): who for i, who in done.items()})
        todo = [i for i in range(len(plan.pieces)) if i not in done and i not in held]
        if todo:
            pipe.rpush(self.keys[3], *todo)
        for i in held:
            pipe.zadd(self.keys[1], {str(i): 2**52})  # the owner's own claim, renewed (`renew`) as any other
        for key in self.keys:
            pipe.expire(key, self.ttl)
        pipe.execute()
        for i in held:
            self.renew(plan.gen, i)

    def load(self) -> Plan | None:
        raw = cast(bytes | None, self.client().hget(self.keys[0], "plan"))
        try:
            return Plan(**json.loads(raw)) if raw else None
        except (ValueError, TypeError):
            return None

    def claim(self, gen: str) -> int:
        """An unfinished piece now leased to the caller, or DONE, GONE or BUSY."""
        return int(self._claim(keys=self.keys, args=[gen, self.lease_ms], client=self.client()))

    def renew(self, gen: str, piece: int) -> None:
        self._mark(keys=self.keys, args=[gen, piece, "", self.lease_ms], client=self.client())

    def finish(self, gen: str, piece: int, who: str) -> bool:
        """The piece is in the file (flushed): done, by `who`. False if the plan is gone (started over)."""
        return bool(self._mark(keys=self.keys, args=[gen, piece, who, ""], client=self.client()))

    def give_back(self, gen: str, piece: int) -> None:
        """The caller could not fetch the piece: another participant may claim it at once."""
        self._mark(keys=self.keys, args=[gen, piece, "", ""], client=self.client())

    def pending(self) -> tuple[int, int]:
        """(pieces claimed now, pieces never claimed)."""
        pipe = self.client().pipeline(transaction=False)
        pipe.zcard(self.keys[1])
        pipe.llen(self.keys[3])
        claimed, unclaimed = pipe.execute()
        return int(claimed), int(unclaimed)

    def done(self) -> dict[int, str]:
        raw = cast(dict[bytes, bytes], self.client().hgetall(self.keys[2]))
        return {int(i): who.decode() for i, who in raw.items()}

    def refuse(self, gen: str, why: str) -> None:
        """The server's ranges must not be spliced in (a participant saw a 200, a wrong Content-Range or another
        validator): the owner starts the file over."""
        r = self.client()
        if r.hget(self.keys[0], "gen") == gen.encode():
            r.hset(self.keys[0], "bad", why)

    def refused(self) -> str | None:
        raw = cast(bytes | None, self.client().hget(self.keys[0], "bad"))
        return raw.decode() if raw else None

    def drop(self) -> None:
        self.client().delete(*self.keys)


def new_gen() -> str:
    return secrets.token_hex(8)


def who_fetched(done: dict[int, str]) -> dict[str, object]:
    """The record's account of a shared file: how many workers fetched its pieces, how many each ("w1@host:5
    w2@host:3"), and how many tasks (connections) did."""
    workers = Counter(who.rpartition(" ")[0] or who for who in done.values())
    return {"workers": len(workers), "fetched_by": " ".join(f"{w}:{n}" for w, n in sorted(workers.items())),
            "connections": len(set(done.values()))}
