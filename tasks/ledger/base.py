"""What every side of the ledger shares: its client, its scripts and the reads they all make."""

from __future__ import annotations

import json
from typing import Any, cast

import redis

from .keys import FED, JobKeys
from .records import BLOCK, block_rows
from .scripts import Scripts
from .states import CODES

BATCH = 2000  # URLs per round trip of a long read or write (a multiple of BLOCK: a batch reads whole blocks)


class JobGone(LookupError):
    """The backend has no such job: expired, never created, or the server came back empty."""


class LedgerBase:
    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.r = client
        self.ttl = ttl
        self.scripts = Scripts(client)
        self._numbers: dict[tuple[str, str], int] = {}  # (job, 'w:<worker>' ...) -> its number in the job
        self._block: tuple[tuple[str, int], list[bytes]] | None = None  # the block of URLs read last (`entry`)
        # A final state that leaves this many of its job's messages out wakes the feeders (keys.FEED_CHANNEL);
        # None: never (set for download tasks, from the workers' FLEETFETCH_WINDOW: `clients.for_thread`).
        self.feed_low: int | None = None

    def states(self, job: str, start: int, stop: int) -> list[str | None]:
        """The state of each URL from `start` to `stop` (None: no state yet), from one read of the state bytes."""
        raw = cast(bytes, self.r.getrange(JobKeys(job).state, start, stop - 1)) if stop > start else b""
        return [CODES.get(raw[j:j + 1]) for j in range(stop - start)]

    def state(self, job: str, index: int) -> str | None:
        return self.states(job, index, index + 1)[0]

    def _rows(self, job: str, start: int, stop: int) -> list[bytes | None]:
        """The stored rows (JSON) of URLs `start` to `stop`, from the blocks that hold them."""
        blocks = list(range(start // BLOCK, (stop - 1) // BLOCK + 1)) if stop > start else []
        raw = cast(list[bytes | None], self.r.hmget(JobKeys(job).urls, [str(b) for b in blocks])) if blocks else []
        rows: list[bytes | None] = []
        for b, packed in zip(blocks, raw, strict=True):
            lines = block_rows(packed)
            rows.extend(lines + [None] * (BLOCK - len(lines)) if b < blocks[-1] else lines)
        offset = start - blocks[0] * BLOCK if blocks else 0
        found = rows[offset:offset + stop - start]
        return found + [None] * (stop - start - len(found))

    def meta(self, job: str) -> dict[str, Any]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(JobKeys(job).meta))
        out: dict[str, Any] = {}
        for key, value in raw.items():
            k, v = key.decode(), value.decode()
            out[k] = int(v) if k.startswith("n:") or k in ("bytes", "published", FED) else json.loads(v)
        return out

    def _number(self, job: str, kind: str, value: str) -> int:
        """The number of a worker name ('w') or content type ('c') in the job, asked of Redis once per process."""
        key = (job, f"{kind}:{value}")
        if key not in self._numbers:
            if len(self._numbers) > 10_000:
                self._numbers.clear()
            self._numbers[key] = int(self.scripts.intern(keys=[JobKeys(job).names], args=[key[1], value, self.ttl]))
        return self._numbers[key]

    def _names(self, job: str) -> dict[int, str]:
        raw = cast(dict[bytes, bytes], self.r.hgetall(JobKeys(job).names))
        return {int(k[1:]): v.decode() for k, v in raw.items() if k.startswith(b"#") and len(k) > 1}

    def in_state(self, job: str, indexes: list[int], state: str) -> list[int]:
        """Those of `indexes` whose URL is in `state` now."""
        if not indexes:
            return []
        pipe = self.r.pipeline(transaction=False)
        for i in indexes:
            pipe.getrange(JobKeys(job).state, i, i)
        return [i for i, s in zip(indexes, pipe.execute(), strict=True) if CODES.get(s) == state]
