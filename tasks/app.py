"""The Celery app and its settings; each value that matters for reliability says why it is what it is."""

from __future__ import annotations

import gc
import logging
import sys
from collections.abc import Sequence
from typing import Any

import celery
import kombu
import redis
from celery import Celery, signals

from . import dependencies, heartbeat, kombu_redis
from .config import QUEUE, Settings, attach, default_concurrency, settings, settings_of
from .feed import Sweeper
from .redact import mask_password

# An older library than pyproject.toml's ranges: one line and exit 2, not a traceback per URL (tasks/fetch.py checks
# requests and urllib3, which only workers import).
dependencies.check(celery, kombu, redis)
# redis:// and rediss:// brokers get kombu's Redis transport with one reused synchronous client per channel instead
# of a new redis.Redis per QoS command, where the kombu installed is one tasks/kombu_redis.py knows.
kombu_redis.install(stock=settings.stock)


def pool_on_command_line(argv: Sequence[str]) -> str | None:
    """The pool a `celery worker` command line names with -P/--pool, if any.

    Celery takes a configured worker_pool over `-P prefork` (prefork is the option's default, so an explicit
    one looks unset): the pool is configured only when the command line names none."""
    for i, arg in enumerate(argv):
        if arg in ("-P", "--pool"):
            return argv[i + 1] if i + 1 < len(argv) else None
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
        if arg.startswith("-P") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
    return None




@signals.worker_init.connect
def _freeze_before_fork(**_: object) -> None:
    """Put what is loaded so far out of the garbage collector's reach before a prefork pool forks: the collector
    then never writes to those pages, so they stay shared with every child (16 children: 551 -> 288 MB PSS)."""
    gc.collect()
    gc.freeze()


@signals.worker_init.connect
def _say_which_broker(sender: Any = None, **_: object) -> None:
    """A worker with no CELERY_BROKER_URL uses a Redis on this machine, while the producer with none starts local
    mode's own server: say so, as the two would never meet."""
    own = settings_of(getattr(sender, "app", None))
    if own.broker_url is None:
        logging.getLogger("fleetfetch").warning(
            "No CELERY_BROKER_URL: this worker uses %s; a producer without it runs its own local mode instead (set "
            "the same CELERY_BROKER_URL for both)", mask_password(own.broker))


@signals.after_setup_logger.connect
def _one_line_per_url(loglevel: int | None = None, **_: object) -> None:
    """Below DEBUG, a worker logs one line per URL, the task's own (`Finished NAME: done, N bytes in S s`,
    `Failed URL: reason`, `Retrying NAME in S s`). Celery's `Task ... received` and `... succeeded in` lines
    (`raised expected` for a failed URL) said the same twice more, with the message's arguments and the whole
    record formatted by `saferepr`: four log records per URL were ~8 % of a worker's Python time on the
    remote-like list. Celery's warnings and errors still show; at DEBUG everything does."""
    if loglevel is None or loglevel > logging.DEBUG:
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


_redis_sockets = {
    "socket_timeout": 30,  # a dead broker connection is noticed instead of hanging a worker
    "socket_connect_timeout": 10,
    "retry_on_timeout": True,
    "health_check_interval": 25,
}

def create_app(settings: Settings, pool: str | None = None) -> Celery:
    """A Celery app configured from `settings`, its workers' tasks reading them from it (`config.settings_of`):
    `app` below for the process's settings, and the tests' in-process workers for configurations of their own."""
    pool = pool or settings.pool
    app = Celery("fleetfetch", include=["tasks.download", "tasks.helper"])
    attach(app, settings)
    heartbeat.install(app)  # health files for probes that start no Python (deploy/README.md)
    app.conf.update(_conf(settings, pool))
    # Every worker looks for URLs whose worker or message was lost (one at a time, under a Redis lock).
    app.steps["worker"].add(Sweeper)
    return app


def _conf(settings: Settings, pool: str) -> dict[str, object]:
    return dict(
        broker_url=settings.broker,
        result_backend=settings.backend,
        # JSON only: a pickle message would run code chosen by whoever can write to the broker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Acknowledge after the work, and give a task back when its process dies (celery #1628): nothing is
        # lost when a worker is killed; the task is idempotent so a second delivery is harmless.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # One reserved task per process: a busy worker does not hoard URLs that an idle one could fetch.
        worker_prefetch_multiplier=1,
        # Redis re-delivers an unacknowledged task after visibility_timeout. It must exceed the task's hard
        # time limit (and any retry countdown), or a still-running download is started a second time.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # Workers sweep for tasks of dead workers (unacknowledged for longer than the visibility timeout)
            # every restore_interval seconds. kombu's default scans only every 10th sweep (~100 s); one
            # indexed ZRANGE per sweep is cheap, so every sweep scans.
            "unacked_restore_interval": settings.restore_interval,
            "unacked_restore_throttle": 1,
            **_redis_sockets,
        },
        result_backend_transport_options={**_redis_sockets},
        redis_socket_timeout=30,
        redis_socket_connect_timeout=10,
        redis_retry_on_timeout=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # wait for the broker forever instead of exiting
        task_time_limit=settings.time_limit,
        task_soft_time_limit=settings.soft_time_limit,
        result_expires=settings.result_expires,  # results do not fill Redis (celery #7801)
        # No SUCCESS result: the ledger keeps each URL's one final record (`results`, `status`), so a Celery result
        # per URL would double what a job costs in Redis (~690 bytes per URL, more than the record itself: 10^7 URLs
        # = 7 GB for nothing). Failures are still stored (Flower, `AsyncResult(...).result` give the one-line reason;
        # they are few). Chosen over a short result_expires: the memory peak would still hold every result of the
        # last expiry period, and a job of 10^7 URLs outlasts any useful expiry.
        task_ignore_result=True,
        task_store_errors_even_if_ignored=True,
        # No STARTED result: the ledger records "started", and a watching Flower gets task-started events; the
        # result would cost one more SETEX + PUBLISH per URL.
        task_track_started=False,
        # Task events (received/started/succeeded: a PUBLISH and its JSON each) only while someone watches:
        # Flower sends `enable_events` to every worker every 5 s (its enable_events option, on by default), and
        # `celery -A tasks control enable_events` or `worker -E` turn them on too.
        worker_send_task_events=False,
        task_send_sent_event=False,
        task_default_queue=QUEUE,
        # On SIGTERM, running downloads get this long to finish before being given back to the queue.
        worker_soft_shutdown_timeout=settings.soft_shutdown_timeout,
        worker_pool=pool,
        worker_concurrency=settings.concurrency or default_concurrency(pool, settings.per_host),
        worker_redirect_stdouts=False,
    )


app = create_app(settings, pool_on_command_line(sys.argv))
