"""The download task's side of the ledger: a URL's transitions and leases, its entry and secrets, and the bytes
of a running download published for the producer's progress."""

from __future__ import annotations

import functools
import json
from typing import Any, cast

from ..message import is_secret_header
from .base import LedgerBase
from .keys import CANCELLED_AT, SECRET_HEADERS, JobKeys
from .records import BLOCK, block_rows, compact, pack, parse_row
from .states import DONE, FINAL


class TaskSide(LedgerBase):
    def transition(self, job: str, index: int, state: str, record: dict[str, Any] | None = None,
                   lease: float | None = None, name: str | None = None) -> str | None:
        """Move one URL to `state`; a non-final state holds a lease of `lease` seconds (see `renew`), a final
        state ends it. `name`: the URL's file name in the ledger (a record's path equal to it is not stored).
        Returns the final state the URL already had (then nothing changed), or None."""
        keys, args = self.transition_keys_args(job, index, state, record, lease, name)
        old = self.scripts.transition(keys=keys, args=args)
        return old.decode() if old else None

    def transition_keys_args(self, job: str, index: int, state: str, record: dict[str, Any] | None = None,
                             lease: float | None = None,
                             name: str | None = None) -> tuple[list[str], list[str | bytes | int]]:
        """The keys and arguments of the transition script (lua/transition.lua) for `transition`'s arguments."""
        k = JobKeys(job)
        payload = b"" if record is None else pack(compact(record, state, name), functools.partial(self._number, job))
        nbytes = int(record.get("bytes") or 0) if record and state == DONE else 0
        due = "" if state in FINAL or lease is None else str(int(lease * 1000))
        wake = [self.feed_low] if self.feed_low is not None and state in FINAL else []
        return [k.meta, k.state, k.rec, k.due], [str(index), state, payload, nbytes, due, *wake]

    def hold(self, held: dict[str, list[int]], seconds: float) -> None:
        """Leases of `seconds` for URLs whose messages a live worker holds ({job: [index, ...]}), one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job, indexes in held.items():
            k = JobKeys(job)
            self.scripts.hold(keys=[k.state, k.due], args=[int(seconds * 1000), *indexes], client=pipe)
        pipe.execute()

    def renew(self, leases: dict[str, list[int]], seconds: float) -> None:
        """Extend the leases of running URLs ({job: [index, ...]}) to `seconds` from now, one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job, indexes in leases.items():
            self.scripts.renew(keys=[JobKeys(job).due], args=[int(seconds * 1000), *indexes], client=pipe)
        pipe.execute()

    def entry(self, job: str, index: int) -> tuple[str, str, str | None, dict[str, Any]] | None:
        """(url, name, sha256, own options) of one URL of the job, as the producer recorded it. Workers read
        a URL's entry only for its secrets; the last block read is kept (URLs run about in order)."""
        where = (job, index // BLOCK)
        cached = self._block
        if cached is None or cached[0] != where:
            packed = cast(bytes | None, self.r.hget(JobKeys(job).urls, str(where[1])))
            cached = (where, block_rows(packed))
            self._block = cached
        rows = cached[1]
        return parse_row(rows[index % BLOCK]) if index % BLOCK < len(rows) else None

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
