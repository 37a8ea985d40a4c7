"""A job: created in the ledger, its tasks published in batches, its records reported."""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import IO, Any

from celery import Celery

from tasks import ledger
from tasks.config import TASK_NAME
from tasks.download import display_args

from .urls import Entry

PUBLISH_BATCH = 1000


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def _chunks(items: Iterable[Entry], size: int) -> Iterator[list[Entry]]:
    it = iter(items)
    while batch := list(islice(it, size)):
        yield batch


def create(book: ledger.Ledger, job: str, entries: Iterable[Entry], meta: dict[str, Any]) -> int:
    """Write the job and its URL list to the ledger (before publishing, so `resume` can finish it)."""
    book.create(job, meta)
    count = 0

    def rows() -> Iterator[tuple[int, str, str, str | None]]:
        nonlocal count
        for e in entries:
            count += 1
            yield e.index, e.url, e.name, e.sha256

    book.add_urls(job, rows())
    book.r.hset(ledger.keys(job)["meta"], "total", json.dumps(count))
    return count


def publish(app: Celery, book: ledger.Ledger, job: str, entries: Iterable[Entry], opts: dict[str, Any]) -> int:
    """One task per URL, pipelined through kombu's publish batches; each batch then marked queued.

    Messages are built with `app.amqp.create_task_message` (Celery's message protocol) and handed to kombu's
    `Producer.publish` directly, rather than through `apply_async`/`send_task_message`. Those would make the
    Redis result backend SUBSCRIBE to every task id (a round-trip per URL, and a million subscriptions held by
    the producer; we follow the job through the ledger's counters instead) and re-check the queue's declaration
    for every message (a quarter of the publishing time, measured with cProfile); here it is declared once.
    Within a batch a publish only buffers: the batch's pipeline is sent when the batch closes.
    """
    amqp = app.amqp
    queue = amqp.queues[amqp.router.route({}, TASK_NAME)["queue"].name]
    sent = 0
    with app.producer_or_acquire() as producer:
        producer.maybe_declare(queue, retry=True)
        for batch in _chunks(entries, PUBLISH_BATCH):
            with producer.batch(max_size=PUBLISH_BATCH):
                for e in batch:
                    task_opts = {**opts, "sha256": e.sha256} if e.sha256 else opts
                    argsrepr, kwargsrepr = display_args(e.url, e.name)
                    headers, properties, body, _ = amqp.create_task_message(
                        f"{job}-{e.index}", TASK_NAME, (e.url, e.name),
                        {"job": job, "index": e.index, "opts": task_opts},
                        argsrepr=argsrepr, kwargsrepr=kwargsrepr, ignore_result=False)
                    producer.publish(body, exchange="", routing_key=queue.name, headers=headers, serializer="json",
                                     declare=[], retry=False, **properties)
            pipe = book.r.pipeline(transaction=True)
            book.queued_pipeline_ops(pipe, job, [e.index for e in batch])
            pipe.execute()
            sent += len(batch)
    return sent


def load_entries(book: ledger.Ledger, job: str) -> Iterator[Entry]:
    """The URLs of `job` that were never published (what `resume` sends)."""
    total = int(book.meta(job).get("total") or 0)
    for i, url, name, digest in book.unpublished(job, total):
        yield Entry(i, url, name, digest)


def write_manifest(book: ledger.Ledger, job: str, total: int, out: IO[str]) -> None:
    """JSON Lines, one record per URL in input order."""
    for index, record, _state in book.records(job, total):
        out.write(json.dumps({"index": index, **(record or {})}, ensure_ascii=False) + "\n")


def failures(book: ledger.Ledger, job: str, total: int) -> list[dict[str, Any]]:
    return [r for _, r, s in book.records(job, total) if s == ledger.FAILED and r]


def manifest_to(path: Path, book: ledger.Ledger, job: str, total: int) -> None:
    # A fresh temp name (O_EXCL): a planted `NAME.tmp` link in a shared directory is never written through.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            write_manifest(book, job, total, fh)
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plainly created file would be (mkstemp makes it 0600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
