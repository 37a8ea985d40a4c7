"""A job: created in the ledger, its tasks published in batches, its records reported."""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from celery import Celery

from tasks import feed
from tasks.ledger import CANCELLED, CANCELLED_AT, FAILED, FINAL, STATES, Ledger
from tasks.message import Entry, Message, Options, url_options
from tasks.storage import PART_SUFFIX

from .errors import UsageError
from .paths import manifest_place


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def create(ledger: Ledger, job: str, entries: Iterable[Entry], meta: dict[str, Any]) -> int:
    """Write the job and its URL list to the ledger (before publishing, so `resume` can finish it)."""
    return ledger.create(job, meta, ((e.index, e.url, e.name, e.sha256, e.opts) for e in entries))


def publish(app: Celery, ledger: Ledger, job: str, entries: Iterable[Entry], options: Options,
            queue: str = feed.QUEUE) -> int:
    """One task per URL to the job's queue, each carrying the job's options."""
    return feed.publish(app, ledger, job, (Message.of(job, e, options) for e in entries), queue_name=queue)


def load_entries(ledger: Ledger, job: str) -> Iterator[Entry]:
    """The URLs of `job` that were never published (what `resume` sends)."""
    total = int(ledger.meta(job).get("total") or 0)
    for i, url, name, digest, own in ledger.unpublished(job, total):
        yield Entry(i, url, name, digest, own)


def write_manifest(ledger: Ledger, job: str, total: int, out: IO[str]) -> None:
    """JSON Lines, one record per URL in input order."""
    for index, record, _state in ledger.records(job, total):
        out.write(json.dumps({"index": index, **(record or {})}, ensure_ascii=False) + "\n")


def failures(ledger: Ledger, job: str, total: int) -> list[dict[str, Any]]:
    return [r for _, r, s in ledger.records(job, total) if s == FAILED and r]


def manifest_to(path: Path, ledger: Ledger, job: str, total: int) -> None:
    """The job's records renamed into `path`'s place: only where nothing, or a regular file, is (checked before the
    job by `paths.check_manifest`, and again here): a symlink or a device is never replaced by a file."""
    # A fresh temp name (O_EXCL): a planted `NAME.tmp` link in a shared directory is never written through.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            write_manifest(ledger, job, total, fh)
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plainly created file would be (mkstemp makes it 0600)
        place = manifest_place(path)
        if place is not None:
            raise UsageError(f"--manifest {path}: {place} now; the records are in `fleetfetch results {job}`")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe(ledger: Ledger, job: str, meta: dict[str, Any] | None = None,
             stopped: bool = False) -> dict[str, Any]:
    """What `status --json` and `jobs --json` show of a job: its state (running/finished/cancelled, or with
    `stopped`, a local job no command runs now, interrupted) and counts. Never its secret headers."""
    meta = ledger.meta(job) if meta is None else meta
    counts = ledger.counts(job)
    total = int(meta.get("total") or 0)
    if meta.get(CANCELLED_AT) is not None:
        state = "cancelled"
    elif sum(counts[s] for s in FINAL) >= total:
        state = "finished"
    else:
        state = "interrupted" if stopped else "running"
    return {"job": job, "state": state, "total": total, "input": meta.get("input"), "created": meta.get("created"),
            "counts": {s: counts[s] for s in STATES}, "bytes": counts["bytes"],
            "published": counts["published"], "queue": feed.job_queue(meta)}


def recent(ledger: Ledger, limit: int, stopped: bool = False) -> Iterator[dict[str, Any]]:
    """The newest jobs still in the backend, newest first."""
    for job, _created in ledger.recent(limit):
        meta = ledger.meta(job)
        if meta:
            yield describe(ledger, job, meta, stopped)


def remove_parts(ledger: Ledger, job: str, total: int, root: Path) -> int:
    """The temp files (`.NAME.part`) of the job's cancelled URLs under `root`, removed: for local mode when no
    worker runs (a running worker removes its own when it sees the cancel). Returns how many."""
    options = Options(**(ledger.meta(job).get("opts") or {}))
    removed = 0
    for index, state in enumerate(ledger.states(job, 0, total)):
        entry = ledger.entry(job, index) if state == CANCELLED else None
        if entry is None:
            continue
        part = root / url_options(options, entry[3]).subdir / f".{entry[1]}{PART_SUFFIX}"
        if part.is_file() and not part.is_symlink():
            part.unlink()
            removed += 1
    return removed
