"""`python -m tasks.worker -P POOL -c N -n NAME [-c N -n NAME ...]`: workers of this app, started without Celery's
command line. `python -m tasks.worker --per-core`: the whole machine, one worker per core (w1@%h, w2@%h ...).

Local mode starts its workers so. Each is the worker that `celery -A tasks worker -P POOL -c N -n NAME
--loglevel=LEVEL --without-gossip --without-mingle` runs: the same app, settings, pool, signal handlers and warm
shutdown (Celery's own `app.Worker`, which that command builds too). What it skips is importing the command line,
whose plugins (Flower's `celery flower`, the REPL's prompt_toolkit) cost each worker ~0.25 s of CPU at start;
on a 2-core machine booting two workers beside the producer, that is on the critical path of a short job.
The flags are Celery's, so `tasks.app` reads the pool from -P as it does from a `celery worker` command line.

The process imports what a worker needs (Celery, kombu, redis, requests and the task: ~0.2 s of CPU) once and
forks one worker per `-c N -n NAME` pair before any of them starts a thread; it then only waits for them, passes
on the signals it gets (SIGTERM: their warm shutdown; SIGINT, SIGQUIT), and, should one of them end, stops the
others (SIGTERM: they finish the downloads they are running, within --grace, then are killed) and ends with that
worker's exit status. SIGUSR1
(`STOP_NOW`) kills them at once, for a caller that knows they hold no task. Either way it reaps them before it
ends, so none is left to init and their CPU time counts with its own (`getrusage` of its parent). Its process
group holds them all. Nothing outlives a killed parent: when its own parent (the producer) is gone, it kills its
workers (a watchdog thread), and each worker is killed when it is gone (PR_SET_PDEATHSIG).

--per-core is the cluster's one command per machine (the compose file's and the systemd unit's): a threads worker
runs Python on one core, so a machine gets one per core it may use, as the README's `-n w1@%h`, `-n w2@%h` ...
started by hand would. -c N sizes each (default: the worker's own default), -n PREFIX names them PREFIX1@%h ...
(default w). It has no parent watchdog: it is a service's main process, not a producer's child. A supervisor
(Docker's restart policy, systemd's Restart=) starts it again after one of its workers died.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
STOP_NOW = signal.SIGUSR1  # to the process that forked the workers: SIGKILL them (idle), reap them, exit
GRACE_S = 20.0  # after one worker died: how long the others may take to finish their downloads
_KILLING = (STOP_NOW, signal.SIGALRM)  # passed on as SIGKILL (SIGALRM: the grace ran out)
WATCH_S = 0.5  # how often the process that forked the workers checks that its own parent is alive


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child process: get `sig` when the process that started it dies, so none is left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def _watch_parent(parent: int, every: float = WATCH_S) -> None:
    """A thread that sends this process STOP_NOW once its parent is gone (re-parented: the producer was killed, and
    its server with it): the workers' downloads could no longer be recorded, so they are killed, not waited for.
    PR_SET_PDEATHSIG's SIGTERM only asks for a warm shutdown, which waits for those downloads."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os.kill(os.getpid(), STOP_NOW)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.worker", description=__doc__.split("\n")[0])
    parser.add_argument("-P", "--pool", help="the worker pool (threads, prefork, solo; default: FLEETFETCH_POOL, "
                                             "threads)")
    parser.add_argument("-c", "--concurrency", type=int, action="append",
                        help="downloads at once (one per worker; with --per-core: of each)")
    parser.add_argument("-n", "--hostname", action="append",
                        help="the node name (one per worker); %%h expands to the host name; with --per-core: the "
                             "names' prefix (default w: w1@%%h, w2@%%h ...)")
    parser.add_argument("--per-core", action="store_true",
                        help="one worker per core this process may use (the machine's workers in one command)")
    parser.add_argument("-l", "--loglevel", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level (default: INFO, one line per URL)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no start-up banner (as celery worker --quiet)")
    parser.add_argument("--grace", type=float, default=GRACE_S,
                        help="once a worker died, seconds the others may take to finish the downloads they run "
                             "before they are killed (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.per_core:
        if len(args.concurrency or ()) > 1 or len(args.hostname or ()) > 1:
            parser.error("with --per-core, give at most one -c N (each worker's) and one -n PREFIX")
        workers = per_core((args.concurrency or [None])[0], (args.hostname or ["w"])[0])
        return forked(args.pool or _default_pool(), workers, args.loglevel, args.quiet, args.grace, watch=False)
    if args.pool is None or not args.concurrency or len(args.concurrency) != len(args.hostname or ()):
        parser.error("give -P POOL and one -n NAME for each -c N (or --per-core)")
    workers = list(zip(args.concurrency, args.hostname, strict=True))
    return forked(args.pool, workers, args.loglevel, args.quiet, args.grace)


def cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's cpuset, `taskset`)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def per_core(concurrency: int | None, prefix: str) -> list[tuple[int | None, str]]:
    """(concurrency, name) of one worker per core: PREFIX1@%h, PREFIX2@%h ..."""
    return [(concurrency, f"{prefix}{i}@%h") for i in range(1, cores() + 1)]


def _default_pool() -> str:
    from .config import settings

    return settings.pool


def run(pool: str, concurrency: int | None, hostname: str, loglevel: str, quiet: bool) -> int:
    """One worker in this process, until it stops; its exit code."""
    import logging

    from celery.utils.nodenames import default_nodename, host_format

    from .app import app

    worker = app.Worker(hostname=host_format(default_nodename(hostname)), pool_cls=pool, concurrency=concurrency,
                        loglevel=logging.getLevelName(loglevel), without_gossip=True, without_mingle=True, quiet=quiet)
    worker.start()
    return int(worker.exitcode or 0)


def _preload(pool: str) -> None:
    """Do once what each worker would do as it starts: import its pool, its consumer and the task module (with
    requests); then put all of it out of the garbage collector's reach, as a prefork pool does before it forks
    (tasks.app): the workers forked next share those pages instead of collecting them again. Nothing here starts
    a thread or opens a connection."""
    import gc

    import celery.apps.worker  # noqa: F401 - imported for the workers forked next
    import celery.worker.consumer  # noqa: F401
    from celery.concurrency import get_implementation

    from .app import app

    get_implementation(pool)
    app.loader.import_default_modules()
    gc.collect()
    gc.freeze()


def forked(pool: str, workers: list[tuple[int | None, str]], loglevel: str, quiet: bool, grace: float = GRACE_S,
           watch: bool = True) -> int:
    """Import once, fork one worker per (concurrency, name), wait for them; the first non-zero exit status.
    `watch`: stop them when this process's parent is gone (a producer's workers)."""
    _preload(pool)
    sys.stdout.flush()
    sys.stderr.flush()
    grandparent, parent = os.getppid(), os.getpid()
    children: dict[int, str] = {}
    for concurrency, hostname in workers:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                die_with_parent(signal.SIGKILL)  # their parent reaps them; if it is gone, nobody would
                if os.getppid() == parent:  # else the parent died before the line above: nothing to serve
                    code = run(pool, concurrency, hostname, loglevel, quiet)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = hostname
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if signum in _KILLING else signum)

    for signum in (*_FORWARDED, *_KILLING):
        signal.signal(signum, forward)
    if watch:
        _watch_parent(grandparent)
    code, died = 0, ""
    while children:
        pid, status = os.wait()
        hostname = children.pop(pid, "")
        if not hostname:  # not a worker (none other is started here)
            continue
        exit_code = os.waitstatus_to_exitcode(status)
        if not stopping:  # a worker ended on its own (it crashed, or was killed): the others stop too
            how = f"was killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exited with {exit_code}"
            died = f"worker {hostname} (pid {pid}) {how}: the other workers were stopped"
            forward(signal.SIGTERM, None)
            signal.setitimer(signal.ITIMER_REAL, grace)  # then SIGALRM: whoever is left is killed
        code = code or (exit_code if exit_code >= 0 else 128 - exit_code)  # a signal's as a shell shows it
    if died:
        print(died, file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
