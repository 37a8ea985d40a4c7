"""`python -m tasks.worker -P POOL -c N -n NAME`: a worker of this app, started without Celery's command line.

Local mode starts its workers so. Each is the worker that `celery -A tasks worker -P POOL -c N -n NAME
--loglevel=LEVEL --without-gossip --without-mingle` runs: the same app, settings, pool, signal handlers and warm
shutdown (Celery's own `app.Worker`, which that command builds too). What it skips is importing the command line,
whose plugins (Flower's `celery flower`, the REPL's prompt_toolkit) cost each worker ~0.25 s of CPU at start;
on a 2-core machine booting two workers beside the producer, that is on the critical path of a short job.
The flags are Celery's, so `tasks.app` reads the pool from -P as it does from a `celery worker` command line.
"""

from __future__ import annotations

import argparse
import logging

from celery.utils.nodenames import default_nodename, host_format

from .app import app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.worker", description=__doc__.split("\n")[0])
    parser.add_argument("-P", "--pool", required=True, help="the worker pool (threads, prefork, solo)")
    parser.add_argument("-c", "--concurrency", type=int, required=True, help="downloads at once")
    parser.add_argument("-n", "--hostname", required=True, help="the node name; %%h expands to the host name")
    parser.add_argument("-l", "--loglevel", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="log level (default: INFO, one line per URL)")
    args = parser.parse_args(argv)
    worker = app.Worker(hostname=host_format(default_nodename(args.hostname)), pool_cls=args.pool,
                        concurrency=args.concurrency, loglevel=logging.getLevelName(args.loglevel), without_gossip=True,
                        without_mingle=True)
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    raise SystemExit(main())
