"""The Celery app and its settings; each value that matters for reliability says why it is what it is."""

from __future__ import annotations

from celery import Celery

from . import heartbeat
from .config import QUEUE, settings
from .feed import Sweeper

app = Celery("fleetfetch", include=["tasks.download"])
heartbeat.install(app)  # health files for probes that start no Python (deploy/README.md)

_redis_sockets = {
    "socket_timeout": 30,  # a dead broker connection is noticed instead of hanging a worker
    "socket_connect_timeout": 10,
    "retry_on_timeout": True,
    "health_check_interval": 25,
}

app.conf.update(
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
    task_track_started=True,
    worker_send_task_events=True,  # Flower sees tasks
    task_send_sent_event=False,
    task_default_queue=QUEUE,
    # On SIGTERM, running downloads get this long to finish before being given back to the queue.
    worker_soft_shutdown_timeout=settings.soft_shutdown_timeout,
    worker_pool=settings.pool,
    worker_concurrency=settings.concurrency or None,
    worker_redirect_stdouts=False,
)

# Every worker looks for URLs whose worker or message was lost (one at a time, under a Redis lock).
app.steps["worker"].add(Sweeper)
