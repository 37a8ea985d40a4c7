"""The reconciler's side of the ledger: live jobs, URLs whose lease ran out or whose message was lost, and
putting them back to queued."""

from __future__ import annotations

import re
from typing import cast

from .keys import KEEP, LIVE_KEY, JobKeys
from .states import QUEUED, STARTED
from .task_side import TaskSide


class ReconcilerSide(TaskSide):  # it moves URLs as a task does (`transition`)
    def live(self) -> list[str]:
        return sorted(j.decode() for j in cast(set[bytes], self.r.smembers(LIVE_KEY)))

    def mark_finished(self, job: str) -> None:
        """The job is over: the reconciler looks at it no more."""
        self.r.srem(LIVE_KEY, job)

    def expire_with_job(self, job: str) -> None:
        """`rec` and `due` without an expiry (written for a job an older producer created, without KEEP) get the
        job's: transitions no longer set one."""
        k = JobKeys(job)
        pipe = self.r.pipeline(transaction=False)
        for key in (k.meta, k.rec, k.due):
            pipe.ttl(key)
        left, *ttls = cast(list[int], pipe.execute())
        for key, ttl in zip((k.rec, k.due), ttls, strict=True):
            if left > 0 and ttl == -1:
                self.r.expire(key, left)

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
        held = [int(i) for i in cast(list[bytes], self.r.zrange(JobKeys(job).due, 0, -1)) if i != KEEP.encode()]
        started = self.in_state(job, held, STARTED)
        for index in started:
            self.transition(job, index, QUEUED)
        return len(started)

    def requeue(self, job: str, indexes: list[int]) -> dict[int, int]:
        """Put URLs that are not final back to queued; {index: redeliveries so far} of those moved."""
        if not indexes:
            return {}
        k = JobKeys(job)
        out = cast(list[int], self.scripts.requeue(keys=[k.meta, k.state, k.due, k.redelivered], args=indexes))
        return dict(zip(out[::2], out[1::2], strict=True))
