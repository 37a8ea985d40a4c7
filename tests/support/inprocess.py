"""A real worker inside the test's process, for functional tests where a `celery worker` subprocess adds nothing:
the app made from settings of the test's own (`tasks.app.create_app`), served by Celery's embedded test worker
(threads pool) on the tests' real Redis, downloading from a real origin. A job is created in the ledger and fed
as the producer does it (`producer.job.create`, `feed.Feeder`), and its records read back once every URL is final.

Two of them in one process can hold two configurations (one after the other: stopping an embedded worker stops
every consumer of the process, `celery.worker.state.should_terminate`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from celery.contrib.testing.worker import start_worker

from producer import job as jobs
from producer import urls
from tasks import feed, ledger
from tasks.app import create_app
from tasks.config import Settings
from tasks.message import Options


class InProcessWorker:
    """A Celery app of its own settings and, inside `running()`, a worker serving it in this process."""

    def __init__(self, env: dict[str, str]) -> None:
        self.settings = Settings.from_env(env)
        self.app: Celery = create_app(self.settings, "threads")
        self.app.conf.worker_hijack_root_logger = False  # pytest's log capture stays in place
        # The consumer waits for messages 0.1 s at a time, not 1 s: stopping the worker (it notices between waits)
        # then takes a tenth of a second.
        self.app.conf.broker_transport_options = {**self.app.conf.broker_transport_options, "polling_interval": 0.1}
        self.ledger = ledger.Ledger(ledger.client_for(self.settings.backend), self.settings.result_expires)

    @contextlib.contextmanager
    def running(self, concurrency: int = 4) -> Iterator[InProcessWorker]:
        with start_worker(self.app, concurrency=concurrency, pool="threads", perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=30):
            yield self

    def submit(self, lines: list[str], list_file: Path, **options: Any) -> tuple[str, int]:
        """A job of `lines` (written to `list_file` and read as the producer reads a list) with the options a
        producer's command line would set; its first window published. Returns (job id, URLs)."""
        list_file.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        opts = Options(**options)
        job = jobs.new_job_id()
        with urls.read(list_file, list_file.name) as spool:
            total = jobs.create(self.ledger, job, spool.replay(),
                                {"input": list_file.name, "opts": opts.changed(), "created": time.time(),
                                 ledger.FED: 0, ledger.SECRET_HEADERS: [], "queue": feed.QUEUE})
        feed.Feeder(self.app, self.ledger, self.settings.window).feed(job)
        return job, total

    def wait(self, job: str, total: int, timeout: float = 60) -> list[dict[str, Any]]:
        """The job's records (index first) once every URL has a final state."""
        deadline = time.monotonic() + timeout
        while sum(self.ledger.counts(job)[s] for s in ledger.FINAL) < total:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job} not over in {timeout} s: {self.ledger.counts(job)}")
            time.sleep(0.05)
        return [{"index": i, **(record or {})} for i, record, _ in self.ledger.records(job, total)]

    def run(self, lines: list[str], list_file: Path, timeout: float = 60, **options: Any) -> list[dict[str, Any]]:
        return self.wait(*self.submit(lines, list_file, **options), timeout=timeout)
