"""`python -m producer` / `fleetfetch`: enqueue a URL list as a job, follow it, report it."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from tasks import version
from tasks.config import QUEUE, settings
from tasks.message import Options, split_headers

from . import credentials, urls
from . import local as local_mode
from .errors import EXIT_INTERRUPTED, EXIT_OK, CliError, Unreachable, UsageError
from .paths import check_manifest, open_download_dir
from .units import parse_size

# Only what parsing and reading the list need is imported here. Celery, kombu, redis and requests (~0.5 s) load
# inside the commands: a local job starts its server and workers first, and they boot while the rest loads.

POOLS = ("prefork", "threads")
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}")
EPILOG = """exit codes: 0 all downloaded, 1 some failed, 2 bad input or usage, 3 broker/backend unreachable (or it lost
            the job), 4 local mode's embedded server or worker failed, 130 interrupted.
Local mode (no CELERY_BROKER_URL) starts an embedded server and a worker; `fleetfetch URLS_FILE` means `run`."""


def _add_run(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls_file", nargs="+", metavar="URLS_FILE|URL",
                   help="text file, one URL per line (optionally followed by sha256=<hex>); - for stdin; or one or "
                        "more http(s) URLs, as curl and wget take them")
    _add_dir(p, "download directory (local mode; default: FLEETFETCH_DIR, ./downloads) or, in cluster mode, a "
                "relative sub-directory of the workers' FLEETFETCH_DIR (default: FLEETFETCH_DIR itself)")
    p.add_argument("-x", "--force-directories", action="store_true",
                   help="keep host/path/... of each URL under the download directory (as wget -x), each "
                        "directory name sanitised")
    p.add_argument("--manifest", type=Path, help="write JSON Lines, one record per URL, when the job ends")
    p.add_argument("--no-wait", action="store_true",
                   help="cluster mode: enqueue, print the job id and exit 0 (local mode's workers stop with the "
                        "command, so it follows the job, and says so)")
    p.add_argument("--concurrency", type=_positive, default=None,
                   help="local mode: downloads at once (default: FLEETFETCH_CONCURRENCY, else the pool's default)")
    p.add_argument("--pool", default=settings.pool,
                   help=f"local mode: Celery pool, one of {', '.join(POOLS)} (default: %(default)s, FLEETFETCH_POOL)")
    # Options below travel in each message only when given: unset, each worker uses its own FLEETFETCH_* setting.
    p.add_argument("--max-size", type=_size, default=None,
                   help=f"fail a body larger than this (bytes, or 500K, 10M, 2G) (default: the workers' "
                        f"FLEETFETCH_MAX_SIZE, {settings.max_size})")
    p.add_argument("--max-attempts", type=int, default=None,
                   help=f"attempts per URL for transient failures (default: FLEETFETCH_MAX_ATTEMPTS, "
                        f"{settings.max_attempts})")
    p.add_argument("--per-host", type=int, default=None,
                   help=f"most downloads in flight per host across the whole cluster (a host starts with 8 and "
                        f"gets more while it keeps up), 0 = no limit "
                        f"(default: FLEETFETCH_PER_HOST, {settings.per_host})")
    p.add_argument("--host-rate", type=float, default=None,
                   help=f"requests per second per host across the cluster, 0 = no limit "
                        f"(default: FLEETFETCH_HOST_RATE, {settings.host_rate:g})")
    p.add_argument("--content-disposition", action="store_true",
                   help="name files from the server's Content-Disposition header (sanitised; off by default)")
    p.add_argument("--force", action="store_true", help="download even files an earlier run left unchanged")
    p.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="send this header with every request (repeatable); credentials (Authorization, Cookie, "
                        "*-Token, *-Key) are never shown, nor sent to another host after a redirect")
    p.add_argument("-A", "--user-agent", default=None, metavar="UA",
                   help="User-Agent header (default: fleetfetch/VERSION python-requests/VERSION)")
    p.add_argument("--netrc-file", type=Path, default=None, metavar="FILE",
                   help="logins per host from this netrc file, sent (Basic) only to the matching host")
    p.add_argument("--load-cookies", type=Path, default=None, metavar="FILE",
                   help="cookies from this Netscape cookies.txt, sent only to matching domains and paths")
    p.add_argument("--proxy", default=None, metavar="URL",
                   help="send every request through this HTTP proxy, http://[user:password@]host:port (never taken "
                        "from the environment; its address must pass the workers' destination policy); https URLs "
                        "go through a CONNECT tunnel, TLS end to end")
    p.add_argument("--limit-rate", type=_size, default=None, metavar="RATE",
                   help="bytes per second per download, e.g. 500K or 2M: K = 1024 bytes, as in curl (the "
                        "output's kB/s are 1000 bytes) (default: unlimited)")
    p.add_argument("--split", type=int, default=None, metavar="N",
                   help=f"fetch a big file as up to N ranges at once, one connection each, each taking a slot of "
                        f"--per-host (as aria2c -s) (default: FLEETFETCH_SPLIT, {settings.split}; 1 = never)")
    p.add_argument("--min-split-size", type=_size, default=None, metavar="SIZE",
                   help=f"never split a file smaller than this, e.g. 20M (default: FLEETFETCH_MIN_SPLIT_SIZE, "
                        f"{settings.min_split_size})")
    p.add_argument("--queue", default=None, metavar="NAME",
                   help=f"publish the job to this Celery queue, served by workers started with -Q NAME "
                        f"(default: {QUEUE})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output; summary and errors only")


def _add_dir(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("-d", "--dir", default=None, help=text)


def _add_local_dir(p: argparse.ArgumentParser) -> None:
    _add_dir(p, "local mode: the download directory the job ran in (its state is kept there; default: "
                "FLEETFETCH_DIR, ./downloads)")


def _add_job(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", help="the job id printed when the job was enqueued")
    _add_local_dir(p)


def _add_status(p: argparse.ArgumentParser) -> None:
    _add_job(p)
    p.add_argument("--json", action="store_true", help="one JSON object: state, total, counts per state, bytes")


def _add_jobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=20, help="how many of the newest jobs (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="JSON Lines, one object per job (as status --json)")
    _add_local_dir(p)


def _add_results(p: argparse.ArgumentParser) -> None:
    _add_job(p)
    p.add_argument("--manifest", type=Path, help="write the records to this file instead of stdout")


def _add_resume(p: argparse.ArgumentParser) -> None:
    _add_job(p)
    p.add_argument("--manifest", type=Path, help="write JSON Lines, one record per URL, when the job ends")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output; summary and errors only")
    p.add_argument("--no-wait", action="store_true", help="publish and exit 0")


def _subdir(value: str | None, local: bool) -> tuple[Path, str]:
    """(download dir for a local worker, sub-directory passed to tasks), checked as the workers check names."""
    if local:
        return Path(value) if value else settings.download_dir, ""
    if not value:
        return settings.download_dir, ""
    try:  # cluster mode: a sub-directory of the workers' FLEETFETCH_DIR, checked as the workers check names
        return settings.download_dir, urls.check_subdir(value, "--dir ")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _queue(name: str | None, local: bool) -> str:
    """The job's queue: --queue, checked (a Redis list name the workers' -Q can name), or the default one."""
    if name is None:
        return QUEUE
    if local:
        raise UsageError("--queue: local mode's worker serves only its own queue; use --queue with a broker "
                         "(CELERY_BROKER_URL) and workers started with -Q NAME")
    if not _QUEUE_NAME.fullmatch(name):
        raise UsageError(f"--queue {name!r}: use letters, digits and - _ . : (at most 100)")
    return name


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _options(args: argparse.Namespace, subdir: str) -> tuple[Options, list[tuple[str, str]]]:
    """What the user set on the command line (the rest is left to each worker's settings), and the secret
    headers, which stay in the job's ledger instead of travelling in its messages."""
    try:
        headers = [urls.parse_header(h) for h in args.header]
        if args.user_agent is not None:
            urls.parse_header(f"User-Agent: {args.user_agent}")
    except ValueError as exc:
        raise UsageError(f"--header/--user-agent: {exc}") from None
    shown, secret = split_headers(headers)
    if args.split is not None and args.split < 1:
        raise UsageError(f"--split {args.split}: use 1 (one stream) or more")
    options = Options(subdir=subdir, force=args.force, content_disposition=args.content_disposition,
                      max_size=args.max_size, max_attempts=args.max_attempts, per_host=args.per_host,
                      host_rate=args.host_rate, headers=shown, user_agent=args.user_agent,
                      limit_rate=args.limit_rate or None, secret_headers=bool(secret), split=args.split,
                      min_split_size=args.min_split_size)
    return options, secret


def _local_size(args: argparse.Namespace) -> int | None:
    """The local worker's size: --concurrency, or the pool's default for the --per-host typed here; None leaves
    it to the worker (FLEETFETCH_CONCURRENCY, else its own default)."""
    if args.concurrency or args.per_host is None:
        return args.concurrency
    return local_mode.default_size(args.pool, args.per_host, os.cpu_count() or 1)


@contextlib.contextmanager
def _local_cluster(local: bool, download_dir: Path, args: argparse.Namespace,
                   spool: urls.Spool) -> Iterator[local_mode.LocalCluster | None]:
    """Local mode's server and workers for a run of the spooled list, started before the rest of the producer is
    imported; not when the workers would refuse every host of the list (a proxy is judged by the workers)."""
    if not local:
        yield None
        return
    if args.proxy is None:
        from .destinations import every_host_refused

        refused = every_host_refused(spool.replay())
        if refused:
            raise UsageError(f"every URL of the list is refused by the destination policy: {refused}; for a "
                             "server on this machine, e.g. FLEETFETCH_ALLOW_NETWORKS=127.0.0.0/8")
    cluster = local_mode.start(download_dir, _local_size(args), args.pool, urls=spool.count)
    try:
        yield cluster
    finally:
        cluster.close()


def _source(given: list[str]) -> tuple[Path, bool, str]:
    """The list to read: (file, whether it is a temp file, its label in messages). URLs given as arguments (the
    curl/wget habit) are written to a temp file (0600: they may carry passwords) and read as a list."""
    if all(arg.lower().startswith(("http://", "https://")) for arg in given):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as tmp:
            tmp.write("".join(f"{arg}\n" for arg in given))
        return Path(tmp.name), True, "command line"
    if len(given) > 1:
        raise UsageError(f"{given[1]}: give one list file, or http(s) URLs only (not both, nor two files)")
    path, temporary = urls.open_list(given[0])
    return path, temporary, "stdin" if given[0] == "-" else given[0]


def run(args: argparse.Namespace) -> int:
    if args.pool not in POOLS:
        raise UsageError(f"pool {args.pool!r} (--pool or FLEETFETCH_POOL): local mode runs one of {', '.join(POOLS)}")
    check_manifest(args.manifest)
    local = settings.broker_url is None
    download_dir, subdir = _subdir(args.dir, local)
    if local:  # a file in its place is refused now, not as a traceback once local mode starts
        with contextlib.suppress(FileNotFoundError):
            os.close(open_download_dir(download_dir, create=False))
    path, temporary, label = _source(args.urls_file)
    try:
        options, secret = _options(args, subdir)
        logins = credentials.load(args.netrc_file, args.load_cookies, args.proxy)
        options = replace(options, credentials=bool(logins))
        queue = _queue(args.queue, local)
        with urls.read(path, label, args.force_directories) as spool, \
                _local_cluster(local, download_dir, args, spool) as started:
            import redis
            from kombu.exceptions import OperationalError

            from tasks import ledger
            from tasks.redact import mask_password

            from . import commands, progress
            from . import job as jobs
            from .connect import connect

            with connect(local, quiet=args.quiet, started=started) as conn:
                if not local and not args.quiet:  # local mode says where its server is; this says the broker
                    print(f"cluster mode: broker {mask_password(settings.broker)}, result backend "
                          f"{mask_password(settings.backend)} (CELERY_BROKER_URL, CELERY_RESULT_BACKEND)", flush=True)
                job_id = jobs.new_job_id()
                total = jobs.create(conn.ledger, job_id, spool.replay(),
                                    {"input": label, "opts": options.changed(), "created": time.time(),
                                     ledger.FED: 0, ledger.SECRET_HEADERS: secret, "queue": queue,
                                     **({ledger.CREDENTIALS: logins.to_json()} if logins else {})})
                if not args.quiet:
                    print(f"job {job_id}: {progress.plural(total, 'URL')}", flush=True)
                started_at = time.monotonic()
                try:
                    conn.feed(job_id)  # the first FLEETFETCH_WINDOW URLs; the rest as their messages drain
                except (redis.ConnectionError, redis.TimeoutError, OperationalError) as exc:
                    raise Unreachable(f"lost the broker while enqueuing job {job_id} ({exc}); once it is back, "
                                      f"run: fleetfetch resume {job_id}") from None
                if args.no_wait and not local:
                    print(job_id)
                    return EXIT_OK
                if args.no_wait:
                    print("warning: --no-wait: local mode's workers stop with this command, so it follows the job "
                          "(use a broker, CELERY_BROKER_URL, to leave a job to workers)", file=sys.stderr)
                return commands.follow(conn, job_id, total, started_at, args.manifest, args.quiet, local)
    finally:
        if temporary:
            path.unlink(missing_ok=True)


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """A command of producer.commands, imported when it runs."""
    def handler(args: argparse.Namespace) -> int:
        from . import commands

        return int(getattr(commands, name)(args))
    return handler


# Each command once: name -> (handler, arguments, one-line help).
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {
    "run": (run, _add_run, "run a job: download every URL of the list (the default command)"),
    "status": (_command("status"), _add_status, "counts of a job (queued/started/done/failed/cancelled...)"),
    "jobs": (_command("list_jobs"), _add_jobs, "recent jobs, newest first, with their counts and state"),
    "cancel": (_command("cancel"), _add_job, "cancel a job: URLs not started end as cancelled, running ones stop"),
    "results": (_command("results"), _add_results, "one JSON record per URL, in input order"),
    "resume": (_command("resume"), _add_resume,
               "publish the URLs of JOB never enqueued (or cancelled), then follow it"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one `error:` line (exit 2) like every other bad input."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see --help)")


class _ShowVersion(argparse.Action):
    """argparse's version action, with the version read only when it is asked for (tasks/version.py)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **_: object) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, nargs=0,
                         help="show the program's version number and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(_version_line())
        parser.exit()


def _version_line() -> str:
    return f"fleetfetch {version.VERSION}"


def _prog(name: str) -> str:
    return "fleetfetch [run]" if name == "run" else f"fleetfetch {name}"


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per command."""
    p = _Parser(prog="fleetfetch", description="Download every URL of a list, verified.",
                usage="fleetfetch [run] URLS_FILE|URL... [options]\n       fleetfetch COMMAND [options]")
    p.add_argument("-V", "--version", action=_ShowVersion)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}
    for name, (handler, add_arguments, text) in COMMANDS.items():
        # Each command's own usage line names it alone (argparse would prefix the whole top-level usage).
        cp = sub.add_parser(name, help=text, description=text, epilog=EPILOG, prog=_prog(name),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(cp)
        cp.set_defaults(handler=handler)
        commands[name] = cp
    return p, commands


def entry() -> NoReturn:
    """The command's entry point (`python -m producer`, `fleetfetch`): `main`, then exit at once. Python's own
    shutdown would then collect garbage and tear down the ~600 modules a run imports (Celery, kombu, redis), ~50 ms
    after the summary is out, freeing memory the process gives back by ending anyway. Local mode has stopped its
    server and workers by then, and the producer leaves no thread with work to finish."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # output to a closed pipe: the status Python's own exit gives then
        code = code or 120
    os._exit(code)


def _interrupt(_signum: int, _frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    top, commands = parsers()
    if argv in (["-h"], ["--help"]):  # the commands, then the options of the default one
        print(top.format_help() + "\n" + commands["run"].format_help())
        return EXIT_OK
    if argv in (["-V"], ["--version"]):
        print(_version_line())
        return EXIT_OK
    if not argv or argv[0] not in COMMANDS:
        argv = ["run", *argv]  # `fleetfetch URLS_FILE` is `fleetfetch run URLS_FILE`
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout`, a cancelled CI job: stop as on Ctrl-C, and say so
    try:
        args = top.parse_args(argv)
        return int(args.handler(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
