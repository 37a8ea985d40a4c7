"""The commands on a job: following it, `status`, `jobs`, `results`, `resume` and `cancel`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tasks import feed
from tasks.config import settings
from tasks.hostlimit import HostLimiter
from tasks.ledger import CANCELLED_AT, FED, STATES, JobGone, Ledger
from tasks.message import Options

from . import job as jobs
from . import progress
from .connect import Connection, connect
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, Unreachable, UsageError
from .paths import check_manifest, open_state_dir


def follow(conn: Connection, job_id: str, total: int, started: float, manifest: Path | None, quiet: bool,
           local: bool) -> int:
    """Follow a job until every URL is final, then print its summary; the exit code."""
    try:
        counts = progress.follow(conn.ledger, job_id, total, quiet=quiet, alive=conn.problem, tick=conn.sweep,
                                 tick_every=settings.sweep_interval, feed=lambda: conn.feed(job_id), local=local)
    except KeyboardInterrupt:
        if local:
            conn.hurry()
            print(f"\ninterrupted: the local worker and server stop; the job is kept: "
                  f"{again('resume', job_id, conn.download_dir, always=True)}", file=sys.stderr)
        else:
            print(f"\ninterrupted: the job goes on; see it with: fleetfetch status {job_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except JobGone:
        raise Unreachable(f"the result backend no longer has job {job_id} (Redis restarted empty?); run the list "
                          "again: files already downloaded and verified are not fetched again") from None
    elapsed = time.monotonic() - started
    fails = jobs.failures(conn.ledger, job_id, total) if counts["failed"] else []
    if manifest:
        jobs.manifest_to(manifest, conn.ledger, job_id, total)
    print(progress.summary(counts, fails, elapsed), flush=True)
    return exit_for(counts)


def exit_for(counts: dict[str, int]) -> int:
    """0 only when every URL was downloaded (or unchanged): failed or cancelled URLs make it 1."""
    return EXIT_FAILED if counts["failed"] or counts["cancelled"] else EXIT_OK


def status(args: argparse.Namespace) -> int:
    with _connect_to_job(args, worker=False) as conn:
        meta = _existing(conn.ledger, args.job)
        counts = conn.ledger.counts(args.job)
        total = int(meta.get("total") or 0)
        described = jobs.describe(conn.ledger, args.job, meta, conn.stopped)
        running = progress.running_files(conn.ledger, args.job) if counts["started"] else []
        if args.json:
            print(json.dumps({**described, "running": running}))
            return exit_for(counts)
        print(f"job {args.job}: {progress.plural(total, 'URL')}, {described['state']}, input {meta.get('input')}")
        print("  " + ", ".join(f"{s} {counts[s]}" for s in STATES) + f", bytes {counts['bytes']}")
        for f in running[:progress.MAX_RUNNING_SHOWN]:
            print(progress.running_line(f))
        if len(running) > progress.MAX_RUNNING_SHOWN:
            print(f"  ... and {len(running) - progress.MAX_RUNNING_SHOWN} more running")
        for host, until in HostLimiter(conn.ledger.r).paused().items():
            print(f"  host {host} paused until {time.strftime('%H:%M:%S', time.localtime(until))} "
                  "(it answered 429/503, or server errors in a row)")
        fed = total if meta.get(FED) is None else int(meta[FED])  # absent: published whole
        if fed < total and meta.get(CANCELLED_AT) is None:
            print(f"  {progress.plural(total - fed, 'URL')} wait in the ledger for room in the broker "
                  f"(FLEETFETCH_WINDOW {settings.window}): the workers publish them")
        never = total - counts["published"] - (total - fed if meta.get(CANCELLED_AT) is None else 0)
        if never > 0:
            print(f"  {progress.plural(never, 'URL')} never enqueued: {again('resume', args.job, conn.download_dir)}")
        elif described["state"] == "interrupted":
            print(f"  stopped before its end: {again('resume', args.job, conn.download_dir)}")
        return exit_for(counts)


def results(args: argparse.Namespace) -> int:
    check_manifest(args.manifest)
    with _connect_to_job(args, worker=False) as conn:
        total = int(_existing(conn.ledger, args.job).get("total") or 0)
        if args.manifest:
            jobs.manifest_to(args.manifest, conn.ledger, args.job, total)
        else:
            jobs.write_manifest(conn.ledger, args.job, total, sys.stdout)
        return exit_for(conn.ledger.counts(args.job))


def resume(args: argparse.Namespace) -> int:
    check_manifest(args.manifest)
    with _connect_to_job(args, worker=True) as conn:
        meta = _existing(conn.ledger, args.job)
        total = int(meta.get("total") or 0)
        started = time.monotonic()
        if meta.get(CANCELLED_AT) is not None:
            taken = conn.ledger.uncancel(args.job, total)
            if not args.quiet:
                print(f"job {args.job}: cancelled before; taking up its {progress.plural(taken, 'cancelled URL')} "
                      "again", flush=True)
        if meta.get(FED) is not None:  # fed through a window: offered again from the first URL
            sent = conn.feed(args.job, wait=feed.FEED_LOCK_S + 1, again=True)
        else:
            sent = jobs.publish(conn.app, conn.ledger, args.job, jobs.load_entries(conn.ledger, args.job),
                                Options(**(meta.get("opts") or {})), feed.job_queue(meta))
        if not args.quiet:
            print(f"job {args.job}: published {progress.plural(sent, 'URL')} that had no task yet", flush=True)
        if args.no_wait:
            return EXIT_OK
        return follow(conn, args.job, total, started, args.manifest, args.quiet, settings.broker_url is None)


def list_jobs(args: argparse.Namespace) -> int:
    with _connect_to_job(args, worker=False) as conn:
        found = list(jobs.recent(conn.ledger, args.limit, conn.stopped))
    if args.json:
        for job in found:
            print(json.dumps(job))
        return EXIT_OK
    if not found:
        print("no jobs in the result backend")
    for job in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job["created"] or 0))
        n = job["counts"]
        print(f"{job['job']}  {created}  {job['state']:<11}  {n['done']}/{job['total']} downloaded, "
              f"{n['unchanged']} unchanged, {n['failed']} failed, {n['cancelled']} cancelled  {job['input']}")
    return EXIT_OK


def cancel(args: argparse.Namespace) -> int:
    with _connect_to_job(args, worker=False) as conn:
        meta = _existing(conn.ledger, args.job)
        total = int(meta.get("total") or 0)
        if jobs.describe(conn.ledger, args.job, meta)["state"] == "finished":  # nothing left to stop: left as it is
            print(f"job {args.job}: finished already; nothing to cancel")
            return EXIT_OK
        n = conn.ledger.cancel(args.job, total)
        running = conn.ledger.counts(args.job)["started"]
        parts = jobs.remove_parts(conn.ledger, args.job, total, conn.download_dir) if conn.stopped and \
            conn.download_dir else 0
        follow_up = again("resume", args.job, conn.download_dir)
    told = f"job {args.job}: cancelled {progress.plural(n, 'URL')} not started"
    if running:
        told += f"; {running} running stop at their next chunk (their temp files are removed)"
    if parts:
        told += f"; removed {progress.plural(parts, 'temp file')}"
    print(f"{told}. Take it up again with: {follow_up}")
    return EXIT_OK


def again(command: str, job: str, download_dir: Path | None, always: bool = False) -> str:
    """A follow-up command to print, complete: in local mode with the job's directory when it is not the default
    one (`always`: even then), quoted for a shell."""
    line = f"fleetfetch {command} {job}"
    if download_dir is not None and (always or download_dir.resolve() != settings.download_dir.resolve()):
        line += f" -d {shlex.quote(str(download_dir))}"
    return line


def _connect_to_job(args: argparse.Namespace, worker: bool) -> contextlib.AbstractContextManager[Connection]:
    """The cluster's broker, or in local mode the embedded server on the job's download directory."""
    if settings.broker_url is not None:
        return connect(False)
    directory = Path(args.dir) if args.dir else settings.download_dir
    try:
        os.close(open_state_dir(directory, create=False))
    except FileNotFoundError:
        raise UsageError(f"no local jobs in {directory} (give the job's directory with -d, or set "
                         "CELERY_BROKER_URL for a cluster's jobs)") from None
    return connect(True, directory, quiet=True, worker=worker)


def _existing(ledger: Ledger, job: str) -> dict[str, Any]:
    meta = ledger.meta(job)
    if not meta:
        raise UsageError(f"no job {job!r} in the result backend (expired, or another backend?)")
    return meta
