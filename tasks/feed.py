"""Delivering a job's URLs to the workers: publishing their messages, and publishing again what was lost.

The job ledger is the source of truth; a message is only a means of delivery. Redis may lose messages (a
restart without the unacknowledged ones, a queue deleted by hand) and a worker may die holding some; Redis
gives those back only after the visibility timeout (hours). So one sweeper at a time (a Redis lock), in every
worker and in a following producer, looks for URLs of live jobs that no message will deliver and publishes
them again:
  - overdue: a lease ran out (the worker running it, or holding its retry or host wait, is gone);
  - queued with no message: the queue is empty and no worker holds its message (seen at two sweeps in a row).
A duplicate is harmless: the ledger keeps one final record, the part-file lock lets one attempt write.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import Any, cast

import redis
from celery import Celery, bootsteps
from redis.lock import Lock

from . import kombu_redis
from .config import QUEUE, TASK_NAME, Settings, settings_of
from .ledger import (
    CANCELLED,
    CANCELLED_AT,
    FAILED,
    FED,
    FEED_CHANNEL,
    FINAL,
    QUEUED,
    EndWatch,
    JobKeys,
    Ledger,
    client_for,
    counts_in,
)
from .message import Entry, Message, Options, RetryState
from .redact import redact_url

log = logging.getLogger("fleetfetch")

PUBLISH_BATCH = 1000
# A job's first batch is small, so its first downloads start while the rest of the window is built (~50 µs per
# message: with 1000 in the first batch, the first reached the queue ~50 ms later).
FIRST_BATCH = 100
FEED_TICK = 1.0  # how often each worker looks whether a job's window has room (a few reads per live job)
SWEEP_BATCH = 500  # URLs republished per job per sweep at most: a sweep stays short
LOCK_KEY = "ff:sweep:lock"


def _chunks(items: Iterable[Message], size: int) -> Iterator[list[Message]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def publish(app: Celery, ledger: Ledger, job: str, messages: Iterable[Message], *, mark: bool = True,
            queue_name: str = QUEUE) -> int:
    """One task per URL to `queue_name` (the job's queue: `--queue`), pipelined through kombu's publish batches;
    each batch then marked queued. A retry goes back to the queue its message came from (Celery's retry keeps
    the routing key).

    Messages are built with `app.amqp.create_task_message` (Celery's message protocol) and handed to kombu's
    `Producer.publish` directly, rather than through `apply_async`/`send_task_message`. Those would make the
    Redis result backend SUBSCRIBE to every task id (a round-trip per URL, and a million subscriptions held by
    the producer; we follow the job through the ledger's counters instead) and re-check the queue's declaration
    for every message (a quarter of the publishing time, measured with cProfile); here it is declared once.
    """
    amqp = app.amqp
    queue = amqp.queues[queue_name]  # declared on demand (task_create_missing_queues)
    sent = 0
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(queue, retry=True)
        for batch in _chunks(messages, PUBLISH_BATCH):
            with producer.batch(max_size=PUBLISH_BATCH):
                for m in batch:
                    headers, body = wire(app, job, m)
                    producer.publish(body, exchange="", routing_key=queue.name, headers=headers,
                                     content_type="application/json", content_encoding="utf-8", declare=[],
                                     retry=False)
            if mark:
                pipe = ledger.r.pipeline(transaction=True)
                ledger.mark_queued(pipe, job, [m.index for m in batch])
                pipe.execute()
            sent += len(batch)
    return sent


def wire(app: Celery, job: str, m: Message) -> tuple[dict[str, Any], str]:
    """(headers, JSON body) of a task message as it is stored in the broker: Celery's message protocol (v2)
    without the headers whose value is the one a worker assumes when the header is absent (eta, expires, group,
    retries 0, time limits, root_id = id...) and without argsrepr/kwargsrepr (the worker shows the args: they carry
    the URL without secrets; `display_of`); compact JSON, no correlation id or reply-to (no reply is awaited).
    A message of 1,174 bytes in Redis becomes 590 (bench/memory.py)."""
    task_id = f"{job}-{m.index}"
    args, kwargs = m.encode()
    headers, _properties, (args, kwargs, _embed), _ = app.amqp.create_task_message(
        task_id, TASK_NAME, args, kwargs, argsrepr="", kwargsrepr="", ignore_result=True)
    kept = {k: v for k, v in headers.items() if k not in _ASSUMED or v != _ASSUMED[k]}
    kept.pop("root_id" if headers.get("root_id") == task_id else "", None)
    return kept, json.dumps([args, kwargs, {}], separators=(",", ":"), ensure_ascii=False)


# Protocol v2 headers and the value a worker assumes when they are absent (celery.worker.request.Request: .get()).
_ASSUMED: dict[str, Any] = {"shadow": None, "eta": None, "expires": None, "group": None, "group_index": None,
                            "retries": 0, "timelimit": [None, None], "parent_id": None, "argsrepr": "",
                            "kwargsrepr": "", "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {}}


class Feeder:
    """Keeps at most `window` (FLEETFETCH_WINDOW) messages of a job in the broker: the job's URLs wait in the
    ledger (`urls`, by index) and are published in index order as the messages before them end. The producer
    publishes the first window; then whoever calls `feed` (every worker's Sweeper each second, a following
    producer) tops it up, one at a time per job (a Redis lock), so a job enqueued with --no-wait ends with
    workers alone. In the broker means published and not final: a URL retrying or running counts too."""

    def __init__(self, app: Celery, ledger: Ledger, window: int) -> None:
        self.app, self.ledger, self.window = app, ledger, window

    def feed_live(self) -> int:
        return sum(self.feed(job) for job in self.ledger.live())

    def feed(self, job: str, wait: float = 0.0, again: bool = False) -> int:
        """Publish the job's next URLs while it has fewer than `window` messages out; returns how many. With
        `wait`, waits that long for a feeder of the job that holds the lock (`resume` after a killed producer);
        `again`: offer every URL without a state once more, from the first (`resume`)."""
        progress = self.ledger.feeding(job)
        if progress is None or (progress[0] >= progress[1] and not again):
            return 0  # published whole (a job of an older producer), or every URL offered already
        lock = self.ledger.r.lock(JobKeys(job).feeding, timeout=FEED_LOCK_S, sleep=0.2,
                                blocking_timeout=wait)
        if not lock.acquire(blocking=wait > 0):
            return 0  # another worker (or the producer) feeds this job now
        try:
            if again:
                self.ledger.mark_fed(job, 0)
            return self._top_up(job, lock)
        finally:
            with contextlib.suppress(redis.exceptions.LockError):  # expired and taken meanwhile: not ours
                lock.release()

    def _top_up(self, job: str, lock: Lock) -> int:
        meta = self.ledger.meta(job)
        fed, total = int(meta.get(FED) or 0), int(meta.get("total") or 0)
        if meta.get(CANCELLED_AT) is not None:
            return 0
        counts = counts_in(meta)  # read with the meta above: one round trip per job and tick
        room = self.window - (counts["published"] - sum(counts[s] for s in FINAL))
        options, queue, sent = job_options(self.ledger, job), job_queue(meta), 0
        while room > 0 and fed < total:
            upto = min(total, fed + min(room, FIRST_BATCH if fed == 0 else PUBLISH_BATCH))
            batch = [Message.of(job, Entry(*row), options) for row in self.ledger.unpublished(job, upto, start=fed)]
            if batch:
                publish(self.app, self.ledger, job, batch, queue_name=queue)
            self.ledger.mark_fed(job, upto)
            lock.reacquire()  # held while batches go out; a killed feeder's runs out soon
            fed, room, sent = upto, room - len(batch), sent + len(batch)
        return sent


FEED_LOCK_S = 10.0  # a feeder that died holding the lock delays the job's feeding this long at most


def job_options(ledger: Ledger, job: str) -> Options:
    return Options(**(ledger.meta(job).get("opts") or {}))


def job_queue(meta: dict[str, Any]) -> str:
    """The queue a job's messages go to (`--queue`, kept in its meta), the default one otherwise."""
    return str(meta.get("queue") or QUEUE)


class Reconciler:
    """Finds the URLs of live jobs that nothing will deliver, and publishes them again. `settings`: the sweep
    interval, the URL lease and the most redeliveries (the app's, for an app that has none of its own)."""

    def __init__(self, app: Celery, ledger: Ledger, broker: redis.Redis | None,
                 settings: Settings | None = None) -> None:
        self.app, self.ledger, self.broker = app, ledger, broker
        self.settings = settings or settings_of(app)

    def sweep(self) -> int:
        """One pass over the live jobs under the cluster-wide lock; returns the URLs published again."""
        # Never released: it lapses after 90 % of a sweep interval, so the cluster sweeps about once an interval.
        if not self.ledger.r.lock(LOCK_KEY, timeout=self.settings.sweep_interval * 0.9).acquire(blocking=False):
            return 0  # another worker (or the producer) sweeps now
        healed = 0
        for job in self.ledger.live():
            meta = self.ledger.meta(job)
            if not meta:
                self.ledger.mark_finished(job)  # expired: nothing to heal
                continue
            if "total" not in meta:
                continue  # being created: its URLs are still being written (the feeder waits for them too)
            counts, total = counts_in(meta), int(meta.get("total") or 0)
            self.ledger.expire_with_job(job)
            if sum(counts[s] for s in FINAL) >= total:
                self.ledger.mark_finished(job)
            else:
                healed += self.heal(job, counts)
        return healed

    def heal(self, job: str, counts: dict[str, int]) -> int:
        lost = self.ledger.overdue(job, SWEEP_BATCH)
        if self.ledger.cancelled(job):  # nothing of a cancelled job is published again: what was lost ends here
            for index in lost:
                self.ledger.transition(job, index, CANCELLED)
            return 0
        queue = job_queue(self.ledger.meta(job))
        if counts[QUEUED] and self.broker is not None:
            lost += self._queued_without_message(job, check_queue=self._queue_empty(queue))
        if not lost:
            return 0
        moved = self.ledger.requeue(job, sorted(set(lost)))
        options = job_options(self.ledger, job)
        messages = []
        for index, times in moved.items():
            entry = self.ledger.entry(job, index)
            if entry is None:
                continue
            url, name, digest, own = entry
            if times > self.settings.max_redeliveries:
                record = {"url": redact_url(url), "status": FAILED, "path": name, "redeliveries": times - 1,
                          "reason": f"its worker was lost {times - 1} times (killed, out of memory?); "
                                    "not tried again (FLEETFETCH_MAX_REDELIVERIES)"}
                self.ledger.transition(job, index, FAILED, record)
                continue
            messages.append(Message.of(job, Entry(index, url, name, digest, own), options,
                                       RetryState(redeliveries=times)))
        if messages:
            publish(self.app, self.ledger, job, messages, mark=False, queue_name=queue)
            log.warning("Published %d URL(s) of job %s again: their worker or message was lost", len(messages), job)
        return len(messages)

    def _queue_empty(self, queue: str) -> bool:
        return self.broker is not None and int(cast(int, self.broker.llen(queue))) == 0

    def _held(self) -> dict[str, float]:
        """Task id -> when it was delivered, for every message a worker holds unacknowledged."""
        assert self.broker is not None
        return kombu_redis.held(self.broker)

    def _queued_without_message(self, job: str, check_queue: bool) -> list[int]:
        """Queued URLs that no message will deliver, now and at the previous sweep: in no queue and held by no
        worker (looked for once the queue is empty), or held unstarted for longer than a lease (by a worker that
        is gone: Redis would give the message back only after the visibility timeout)."""
        held = self._held()
        stale = time.time() - self.settings.url_lease
        prefix = f"{job}-"
        now = {int(tid[len(prefix):]) for tid, at in held.items() if tid.startswith(prefix) and at < stale}
        if check_queue:
            now |= {i for i in self.ledger.queued(job, SWEEP_BATCH) if f"{prefix}{i}" not in held}
        now = self.ledger.without_lease(job, self.ledger.in_state(job, sorted(now), QUEUED))
        k = JobKeys(job)
        before = {int(i) for i in cast(set[bytes], self.ledger.r.smembers(k.suspect))}
        pipe = self.ledger.r.pipeline(transaction=True)
        pipe.delete(k.suspect)
        if now - before:
            pipe.sadd(k.suspect, *(now - before))
            pipe.expire(k.suspect, self.ledger.ttl)
        pipe.execute()
        return sorted(now & before)


def broker_client(url: str) -> redis.Redis | None:
    """A client of the broker when it is Redis (its queue and unacknowledged messages can be looked at)."""
    return client_for(url) if url.startswith(("redis://", "rediss://", "unix://")) else None


def held_by_this_worker() -> dict[str, list[int]]:
    """{job: [index, ...]} of the messages this worker process holds: reserved, waiting for a countdown, running."""
    from celery.worker import state

    held: dict[str, list[int]] = {}
    try:
        requests = [*state.reserved_requests, *getattr(state, "scheduled_requests", ())]
    except RuntimeError:  # the consumer added one meanwhile (a WeakSet): the next tick sees them
        return held
    for request in requests:
        if getattr(request, "name", TASK_NAME) != TASK_NAME:
            continue  # a big file's helper (tasks/helper.py) holds no URL
        kwargs = request.kwargs  # a message's: anything a broker user sent (download's decode refuses it later)
        if isinstance(kwargs, dict) and isinstance(kwargs.get("job"), str) and type(kwargs.get("index", 0)) is int:
            held.setdefault(kwargs["job"], []).append(kwargs.get("index", 0))
    return held


class Sweeper(bootsteps.StartStopStep):
    """In each worker's main process: the feeder (jobs' windows topped up) every second and at once when a job's
    messages out fall to half its window (a final state announces it on FEED_CHANNEL), leases for the
    messages it holds (a URL reserved or waiting for its countdown is as alive as its worker), and the reconciler
    every FLEETFETCH_SWEEP_INTERVAL seconds."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.stopped = threading.Event()

    def start(self, worker: Any) -> None:
        threading.Thread(target=self._loop, args=(worker.app,), name="fleetfetch-sweeper", daemon=True).start()

    def stop(self, worker: Any) -> None:
        self.stopped.set()

    terminate = stop  # a cold shutdown calls this instead: an embedded worker's thread must not outlive it

    def _loop(self, app: Celery) -> None:
        reconciler, feeder, last_sweep, last_hold = None, None, time.monotonic(), 0.0
        settings = settings_of(app)  # the worker's app's
        hold_every = min(settings.url_lease / 3, settings.sweep_interval)
        wake: EndWatch | None = None  # a job's window half drained (FEED_CHANNEL), or the tick
        while not self.stopped.is_set():
            if wake is None:
                self.stopped.wait(min(FEED_TICK, hold_every))
            else:
                wake.wait(min(FEED_TICK, hold_every))
            if self.stopped.is_set():
                break
            try:
                if reconciler is None or feeder is None:
                    ledger = Ledger(client_for(settings.backend), settings.result_expires)
                    reconciler = Reconciler(app, ledger, broker_client(settings.broker), settings)
                    feeder = Feeder(app, ledger, settings.window)
                    wake = EndWatch(ledger.r, FEED_CHANNEL)
                held = held_by_this_worker()
                if held and time.monotonic() - last_hold >= hold_every:
                    last_hold = time.monotonic()
                    reconciler.ledger.hold(held, settings.url_lease)
                if time.monotonic() - last_sweep >= settings.sweep_interval:
                    last_sweep = time.monotonic()
                    reconciler.sweep()
            except Exception as exc:  # noqa: BLE001 - a broker outage must not end the sweeper
                log.warning("Sweep for lost URLs failed (will try again): %s", exc)
            try:
                if feeder is not None:
                    feeder.feed_live()
            except Exception as exc:  # noqa: BLE001 - nor the feeder: leases and sweeps go on without it
                log.warning("Feeding jobs' windows failed (will try again): %s", exc)
        if wake is not None:
            wake.close()
