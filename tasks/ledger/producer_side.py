"""The producer's side of the ledger: a job created, its URLs marked published, cancelled and taken up again,
followed (counters, the end, bytes in flight) and reported (records in input order)."""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, cast

from ..redact import redact_url
from .base import BATCH, JobGone, LedgerBase
from .keys import CANCELLED_AT, COUNTERS, CREDENTIALS, FED, JOBS_KEY, KEEP, LIVE_KEY, JobKeys
from .records import BLOCK, Row, counts_in, expand, parse_row, unpack
from .states import STARTED, STATES
from .watch import EndWatch


class ProducerSide(LedgerBase):
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
        pipe.hset(k.rec, KEEP, b"")
        pipe.zadd(k.due, {KEEP: "+inf"})
        for key in (k.rec, k.due):
            pipe.expire(key, self.ttl)
        pipe.hset(k.meta, "total", json.dumps(total))
        pipe.execute()
        return total

    def mark_queued(self, pipe: Any, job: str, indexes: list[int]) -> None:
        """Mark URLs queued, in the same transaction (`pipe`) that publishes their tasks; a URL that already has a
        state (a `cancel` while the job was being enqueued) keeps it."""
        k = JobKeys(job)
        self.scripts.mark_queued(keys=[k.meta, k.state], args=[self.ttl, *indexes], client=pipe)

    def cancel(self, job: str, total: int) -> int:
        """Stop a job: flag it (running URLs stop at their next chunk), cancel every URL not started yet and
        take the job off the live set. Returns the URLs cancelled here."""
        k = JobKeys(job)
        n = 0
        for start in range(0, max(total, 1), BATCH):  # the flag with the first batch (also of a job with no URL)
            flag = json.dumps(time.time()) if start == 0 else ""
            n += int(self.scripts.cancel(keys=[k.meta, k.state, k.due],
                                  args=[self.ttl, flag, *range(start, min(total, start + BATCH))]))
        return n

    def uncancel(self, job: str, total: int) -> int:
        """Take a cancelled job up again: its cancelled URLs become unpublished (what `resume` sends)."""
        k = JobKeys(job)
        n = 0
        for start in range(0, total, BATCH):
            indexes = list(range(start, min(total, start + BATCH)))
            n += int(self.scripts.uncancel(keys=[k.meta, k.state, k.rec], args=indexes))
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

    def mark_fed(self, job: str, upto: int) -> None:
        """URLs below `upto` have been offered to the broker."""
        self.r.hset(JobKeys(job).meta, FED, upto)

    def cancelled(self, job: str) -> bool:
        return bool(self.r.hexists(JobKeys(job).meta, CANCELLED_AT))

    def recent(self, limit: int) -> list[tuple[str, float]]:
        """(job, creation time) of the newest jobs, newest first."""
        found = self.r.zrevrange(JOBS_KEY, 0, limit - 1, withscores=True)
        return [(j.decode(), float(t)) for j, t in cast(list[tuple[bytes, float]], found)]

    def counts(self, job: str) -> dict[str, int]:
        """All counters in one round-trip, however large the job; JobGone if the job is not there."""
        values = self.r.hmget(JobKeys(job).meta, COUNTERS)
        if all(v is None for v in values):
            raise JobGone(job)
        return counts_in(dict(zip(COUNTERS, values, strict=True)))

    def end_of(self, job: str) -> EndWatch:
        """What a follower of the job waits on between two looks at its counters (`EndWatch`)."""
        return EndWatch(self.r, JobKeys(job).ended)

    def unpublished(self, job: str, stop: int, start: int = 0) -> Iterator[Row]:
        """URLs of the job from `start` to `stop` that have no state yet: never published (`resume`, the feeder)."""
        for first in range(start, stop, BATCH):
            last = min(stop, first + BATCH)
            states = self.states(job, first, last)
            if any(s is None for s in states):
                for i, s, raw in zip(range(first, last), states, self._rows(job, first, last), strict=True):
                    if s is None and raw:
                        yield (i, *parse_row(raw))

    def records(self, job: str, total: int) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
        """(index, final record or None, state) for every URL, in input order, fetched in batches."""
        k = JobKeys(job)
        names = self._names(job)
        for start in range(0, total, BATCH):
            stop = min(total, start + BATCH)
            recs = cast(list[bytes | None], self.r.hmget(k.rec, [str(i) for i in range(start, stop)]))
            states, rows = self.states(job, start, stop), self._rows(job, start, stop)
            for i, rec, state, row in zip(range(start, stop), recs, states, rows, strict=True):
                url, name = parse_row(row)[:2] if row else ("", "")
                if rec:
                    record = expand(unpack(rec, names), url, state or "", name)
                elif row:
                    record = {"url": redact_url(url), "path": name, "status": state or "unpublished"}
                else:
                    record = None
                yield i, record, state

    def in_flight(self, job: str) -> tuple[int, int | None]:
        """(bytes so far of the job's running downloads, the size they will have in all: None when one did not
        announce it). Entries of URLs no longer started (their worker was killed) do not count."""
        files = self.running_files(job)
        done = sum(b for b, _ in files.values())
        unknown = any(size is None for _, size in files.values())
        return done, None if unknown else sum(size or 0 for _, size in files.values())

    def running_files(self, job: str) -> dict[int, tuple[int, int | None]]:
        """index -> (bytes so far, size or None) of each running download that published its bytes (`running`);
        URLs no longer started (their worker was killed) are left out."""
        raw = cast(dict[bytes, bytes], self.r.hgetall(JobKeys(job).flight))
        if not raw:
            return {}
        live = set(self.in_state(job, [int(i) for i in raw], STARTED))
        files: dict[int, tuple[int, int | None]] = {}
        for index, value in raw.items():
            if int(index) in live:
                size, _, total = value.decode().partition(" ")
                files[int(index)] = (int(size), int(total) if total else None)
        return files

    def record(self, job: str, index: int) -> dict[str, Any] | None:
        raw = cast(bytes | None, self.r.hget(JobKeys(job).rec, str(index)))
        if not raw:
            return None
        row = self._rows(job, index, index + 1)[0]
        url, name = parse_row(row)[:2] if row else ("", "")
        return expand(unpack(raw, self._names(job)), url, self.state(job, index) or "", name)
