"""`python -m producer` / `fleetfetch`: enqueue a URL list as a job, follow it, report it."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import redis
from kombu.exceptions import OperationalError

from tasks import ledger
from tasks.config import default_concurrency, settings
from tasks.hostlimit import HostLimiter

from . import job as jobs
from . import progress, urls
from .connect import Connection, connect
from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, Unreachable, UsageError

COMMANDS = ("run", "status", "results", "resume")
EPILOG = """commands:
  fleetfetch URLS_FILE [options]        run a job (the default command; URLS_FILE may be - for stdin)
  fleetfetch status JOB                 counts of a job (queued/started/done/failed...)
  fleetfetch results JOB [--manifest F] one JSON record per URL, in input order
  fleetfetch resume JOB                 publish the URLs of JOB that were never enqueued, then follow it

exit codes: 0 all downloaded, 1 some failed, 2 bad input or usage, 3 broker/backend unreachable,
            130 interrupted.  Local mode (no CELERY_BROKER_URL) starts an embedded server and a worker."""


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetfetch", description="Download every URL of a list, verified.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls_file", help="text file, one URL per line (optionally followed by sha256=<hex>)")
    p.add_argument("-d", "--dir", default=None,
                   help="download directory (local mode; default ./downloads) or, in cluster mode, a relative "
                        "sub-directory of the workers' FLEETFETCH_DIR (default: FLEETFETCH_DIR itself)")
    p.add_argument("--manifest", type=Path, help="write JSON Lines, one record per URL, when the job ends")
    p.add_argument("--no-wait", action="store_true", help="enqueue, print the job id and exit 0")
    p.add_argument("--concurrency", type=int, default=settings.concurrency or None,
                   help="local mode: the worker's threads (default: --per-host, 32 if that is 0) or prefork "
                        "processes (default: cores) (FLEETFETCH_CONCURRENCY)")
    p.add_argument("--pool", default=settings.pool, choices=("prefork", "threads"),
                   help="local mode: Celery pool (default: %(default)s, FLEETFETCH_POOL)")
    p.add_argument("--max-size", type=int, default=settings.max_size,
                   help="fail a body larger than this many bytes (default: %(default)s, FLEETFETCH_MAX_SIZE)")
    p.add_argument("--max-attempts", type=int, default=settings.max_attempts,
                   help="attempts per URL for transient failures (default: %(default)s, FLEETFETCH_MAX_ATTEMPTS)")
    p.add_argument("--per-host", type=int, default=settings.per_host,
                   help="downloads in flight per host across the whole cluster, 0 = no limit "
                        "(default: %(default)s, FLEETFETCH_PER_HOST)")
    p.add_argument("--host-rate", type=float, default=settings.host_rate,
                   help="requests per second per host across the cluster, 0 = no limit "
                        "(default: %(default)s, FLEETFETCH_HOST_RATE)")
    p.add_argument("--content-disposition", action="store_true",
                   help="name files from the server's Content-Disposition header (sanitised; off by default)")
    p.add_argument("--force", action="store_true", help="download even files an earlier run left unchanged")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output; summary and errors only")
    return p


def _job_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fleetfetch {command}")
    p.add_argument("job", help="the job id printed when the job was enqueued")
    if command in ("results", "resume"):
        p.add_argument("--manifest", type=Path, help="write the records to this file instead of stdout")
    if command == "resume":
        p.add_argument("-q", "--quiet", action="store_true")
        p.add_argument("--no-wait", action="store_true")
    return p


def _subdir(value: str | None, local: bool) -> tuple[Path, str]:
    """(download dir for a local worker, sub-directory passed to tasks)."""
    if local:
        return Path(value or "downloads"), ""
    if not value:
        return settings.download_dir, ""
    p = Path(value)
    if p.is_absolute() or ".." in p.parts:
        raise UsageError(f"--dir {value!r}: in cluster mode it must be a relative sub-directory of FLEETFETCH_DIR")
    return settings.download_dir, p.as_posix()


def _task_opts(args: argparse.Namespace, subdir: str) -> dict[str, Any]:
    """Only what differs from the workers' defaults travels in each message (messages stay small)."""
    opts: dict[str, Any] = {"subdir": subdir} if subdir else {}
    if args.force:
        opts["force"] = True
    if args.content_disposition:
        opts["content_disposition"] = True
    for key, default in (("max_size", settings.max_size), ("max_attempts", settings.max_attempts),
                         ("per_host", settings.per_host), ("host_rate", settings.host_rate)):
        if getattr(args, key) != default:
            opts[key] = getattr(args, key)
    return opts


def run(args: argparse.Namespace) -> int:
    path, temporary = urls.open_list(args.urls_file)
    try:
        label = "stdin" if args.urls_file == "-" else args.urls_file
        urls.validate(path, label)
        local = settings.broker_url is None
        download_dir, subdir = _subdir(args.dir, local)
        opts = _task_opts(args, subdir)
        concurrency = args.concurrency or default_concurrency(args.pool, args.per_host)
        with connect(local, download_dir, concurrency, args.pool, quiet=args.quiet) as conn:
            job_id = jobs.new_job_id()
            with urls.Spool() as spool:
                total = jobs.create(conn.ledger, job_id, spool.recording(urls.entries(path)),
                                    {"input": label, "opts": opts, "created": time.time()})
                if not args.quiet:
                    print(f"job {job_id}: {total} URLs", flush=True)
                started = time.monotonic()
                try:
                    jobs.publish(conn.app, conn.ledger, job_id, spool.replay(), opts)
                except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
                    raise Unreachable(f"lost the broker while enqueuing job {job_id} ({exc}); once it is back, "
                                      f"run: fleetfetch resume {job_id}") from None
            if args.no_wait and not local:
                print(job_id)
                return EXIT_OK
            return _follow(conn, job_id, total, started, args.manifest, args.quiet, local)
    finally:
        if temporary:
            path.unlink(missing_ok=True)


def _follow(conn: Connection, job_id: str, total: int, started: float, manifest: Path | None, quiet: bool,
            local: bool) -> int:
    try:
        counts = progress.follow(conn.ledger, job_id, total, quiet=quiet, alive=conn.problem)
    except KeyboardInterrupt:
        if local:
            conn.hurry()
            print("\ninterrupted: stopping the local worker and server (the job is abandoned)", file=sys.stderr)
        else:
            print(f"\ninterrupted: the job goes on; see it with: fleetfetch status {job_id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    elapsed = time.monotonic() - started
    fails = jobs.failures(conn.ledger, job_id, total) if counts["failed"] else []
    if manifest:
        jobs.manifest_to(manifest, conn.ledger, job_id, total)
    print(progress.summary(counts, fails, elapsed), flush=True)
    return EXIT_FAILED if counts["failed"] else EXIT_OK


def status(args: argparse.Namespace) -> int:
    with connect(False) as conn:
        meta = _existing(conn.ledger, args.job)
        counts = conn.ledger.counts(args.job)
        total = int(meta.get("total") or 0)
        print(f"job {args.job}: {total} URLs, input {meta.get('input')}")
        print("  " + ", ".join(f"{s} {counts[s]}" for s in ledger.STATES) + f", bytes {counts['bytes']}")
        for host, until in HostLimiter(conn.ledger.r).paused().items():
            print(f"  host {host} paused until {time.strftime('%H:%M:%S', time.localtime(until))} "
                  "(it answered 429/503, or server errors in a row)")
        if counts["published"] < total:
            print(f"  {total - counts['published']} URLs were never enqueued: fleetfetch resume {args.job}")
        return EXIT_FAILED if counts["failed"] else EXIT_OK


def results(args: argparse.Namespace) -> int:
    with connect(False) as conn:
        total = int(_existing(conn.ledger, args.job).get("total") or 0)
        if args.manifest:
            jobs.manifest_to(args.manifest, conn.ledger, args.job, total)
        else:
            jobs.write_manifest(conn.ledger, args.job, total, sys.stdout)
        return EXIT_FAILED if conn.ledger.counts(args.job)["failed"] else EXIT_OK


def resume(args: argparse.Namespace) -> int:
    with connect(False) as conn:
        meta = _existing(conn.ledger, args.job)
        total = int(meta.get("total") or 0)
        started = time.monotonic()
        sent = jobs.publish(conn.app, conn.ledger, args.job, jobs.load_entries(conn.ledger, args.job),
                            meta.get("opts") or {})
        if not args.quiet:
            print(f"job {args.job}: published {sent} URLs that had no task yet", flush=True)
        if args.no_wait:
            return EXIT_OK
        return _follow(conn, args.job, total, started, args.manifest, args.quiet, False)


def _existing(book: ledger.Ledger, job: str) -> dict[str, Any]:
    meta = book.meta(job)
    if not meta:
        raise UsageError(f"no job {job!r} in the result backend (expired, or another backend?)")
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in COMMANDS[1:]:
            command = argv[0]
            args = _job_parser(command).parse_args(argv[1:])
            return {"status": status, "results": results, "resume": resume}[command](args)
        if argv and argv[0] == "run":
            argv = argv[1:]
        return run(_run_parser().parse_args(argv))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
