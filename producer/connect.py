"""Connecting the producer: to the configured broker and backend, or to a local cluster it starts."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import Celery
from kombu import Connection as KombuConnection

from tasks import feed, ledger
from tasks.app import app
from tasks.config import settings
from tasks.redact import mask_password

from . import local as local_mode
from .errors import Unreachable

HINT = ("start Redis there (e.g. `redis-server`), fix the URL, or unset CELERY_BROKER_URL to run in local mode "
        "with an embedded server")


@dataclass
class Connection:
    app: Celery
    ledger: ledger.Ledger
    broker: str
    problem: Callable[[], str | None] = lambda: None
    hurry: Callable[[], None] = lambda: None
    download_dir: Path | None = None  # local mode: where the job's files and state are
    stopped: bool = False  # local mode, no local job runs: nothing downloads until `resume`

    def sweep(self) -> int:
        """Publish again the URLs of live jobs that lost their worker or message (the workers do it too)."""
        return feed.Reconciler(self.app, self.ledger, feed.broker_client(self.broker)).sweep()

    def feed(self, job: str, wait: float = 0.0, again: bool = False) -> int:
        """Top up the job's window of messages in the broker (FLEETFETCH_WINDOW; the workers do it too); `wait`:
        how long to wait for another feeder of the job (one killed while holding the lock: FEED_LOCK_MS)."""
        return feed.Feeder(self.app, self.ledger, settings.window).feed(job, wait, again)


def check_redis(url: str, role: str, attempts: int = 12) -> redis.Redis:
    """A client for `url` that has answered PING, retrying a failed command `attempts` times; Unreachable (exit 3)
    with the password masked otherwise."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise Unreachable(f"the {role} must be Redis (redis:// or rediss://), got {mask_password(url)}")
    probe = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    try:
        probe.ping()
    except redis.AuthenticationError:
        raise Unreachable(f"the {role} at {mask_password(url)} refused the password (check the URL)") from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        reason = str(exc).split(". ")[-1].strip(".") or type(exc).__name__
        raise Unreachable(f"cannot reach the {role} at {mask_password(url)} ({reason}): {HINT}") from None
    return ledger.client_for(url, attempts)


def check_broker(url: str) -> None:
    if url.startswith(("redis://", "rediss://")):
        check_redis(url, "broker")
        return
    try:
        with KombuConnection(url, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:  # noqa: BLE001 - kombu raises transport-specific errors
        raise Unreachable(f"cannot reach the broker at {mask_password(url)} ({exc}): {HINT}") from None


def _configure(broker: str, backend: str) -> None:
    """Point the app at `broker`/`backend`. The producer's broker connection does not retry timed-out
    commands itself: kombu pipelines publishes only then (a replayed pipeline could publish twice)."""
    options = {k: v for k, v in app.conf.broker_transport_options.items() if k != "retry_on_timeout"}
    app.conf.update(broker_url=broker, result_backend=backend, broker_transport_options=options)


@contextlib.contextmanager
def connect(local: bool, download_dir: Path | None = None, quiet: bool = False, worker: bool = True,
            started: local_mode.LocalCluster | None = None) -> Iterator[Connection]:
    """Yield a checked connection; in local mode the embedded server (on the download directory's state) and,
    with `worker`, a local worker live inside the block. `started`: a local cluster the caller started already
    (`local.start`), and stops."""
    if not local:
        check_broker(settings.broker)
        client = check_redis(settings.backend, "result backend")
        _configure(settings.broker, settings.backend)
        yield Connection(app, ledger.Ledger(client, settings.result_expires), settings.broker)
        return
    running = None if worker or started else local_mode.attach(download_dir or settings.download_dir)
    if running is not None:  # a local job runs on that directory now: ask its server
        _configure(*running)
        client = check_redis(running[1], "result backend of the local job running there", attempts=1)
        yield Connection(app, ledger.Ledger(client, settings.result_expires), running[0],
                         download_dir=download_dir or settings.download_dir)
        return
    cluster = started or local_mode.start(download_dir or settings.download_dir, None, settings.pool, worker)
    try:
        if not quiet and worker:
            sizes = cluster.sizes
            workers = f"a {cluster.pool} worker" if len(sizes) == 1 else f"{len(sizes)} {cluster.pool} workers"
            print(f"local mode: embedded server on 127.0.0.1:{cluster.port}, {workers} ({sum(sizes)} downloads at "
                  f"once), files into {cluster.download_dir}", flush=True)
        _configure(cluster.broker, cluster.backend)
        # Local mode's server is a child of this process: it restarts with the command only, so no minute of retries.
        client = check_redis(cluster.backend, "result backend", attempts=1)
        yield Connection(app, ledger.Ledger(client, settings.result_expires), cluster.broker,
                         local_mode.one_line(cluster.problem), cluster.hurry, cluster.download_dir, stopped=not worker)
    finally:
        if started is None:
            cluster.close()
