"""Jobs as a user handles them: list them, cancel one (nothing left behind), take it up again."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

from tasks.app import app
from tasks.config import QUEUE
from tasks.feed import Reconciler
from tasks.ledger import CANCELLED, RETRYING, STARTED, Ledger
from tests.conftest import job_id_of, read_manifest, write_list

SIZE = 6 << 20  # 6 MiB at 1 MB/s: still running when the job is cancelled


def _wait(check, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_cancel_ends_every_url_cancelled_leaves_no_temp_files_and_resume_finishes_it(cluster, worker, origin,
                                                                                      tmp_path):
    body = hashlib.sha256(b"seed").digest() * (SIZE // 32)
    paths = [f"/cancel-{i}.bin" for i in range(6)]  # the worker runs 4 at once: 2 wait in the queue
    for p in paths:
        origin.add(p, body, rate=1_000_000)
    listing = write_list(tmp_path / "urls.txt", [origin.url(p) for p in paths])
    queued = cluster.producer(str(listing), "-d", "cancel", "--no-wait")
    assert queued.returncode == 0, queued.stdout + queued.stderr
    job = job_id_of(queued.stdout)
    ledger = Ledger(cluster.backend(), 3600)
    directory = cluster.downloads / "cancel"
    _wait(lambda: ledger.counts(job)["started"] >= 4 and list(directory.glob(".*.part")), what="4 downloads running")

    cancelled = cluster.producer("cancel", job)
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert "cancelled 2 URLs not started" in cancelled.stdout
    _wait(lambda: ledger.counts(job)["cancelled"] == 6, timeout=15, what="every URL cancelled")
    counts = ledger.counts(job)
    assert counts["done"] == counts["failed"] == counts["started"] == counts["queued"] == 0
    assert list(directory.iterdir()) == []  # no temp file, no file
    assert len(origin.requests) == 4  # the two queued URLs were skipped without a request
    status = cluster.producer("status", job, "--json")
    assert status.returncode == 1
    described = json.loads(status.stdout)
    assert described["state"] == "cancelled" and described["counts"]["cancelled"] == 6 and described["total"] == 6
    records = read_manifest(_manifest(cluster, job, tmp_path / "cancelled.jsonl"))
    assert [r["status"] for r in records] == ["cancelled"] * 6
    listed = [json.loads(line) for line in cluster.producer("jobs", "--json").stdout.splitlines()]
    assert {"job": job, "state": "cancelled"}.items() <= next(j for j in listed if j["job"] == job).items()
    time.sleep(1.5)  # a sweep (the producer's or a worker's) publishes nothing of a cancelled job
    assert cluster.broker().llen(QUEUE) == 0 and len(origin.requests) == 4

    for p in paths:
        origin.add(p, body)  # full speed now
    manifest = tmp_path / "m.jsonl"
    resumed = cluster.producer("resume", job, "--manifest", str(manifest))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "taking up its 6 cancelled URLs again" in resumed.stdout
    assert [r["status"] for r in read_manifest(manifest)] == ["done"] * 6
    assert all((directory / p.lstrip("/")).read_bytes() == body for p in paths)
    table = cluster.producer("jobs").stdout
    assert any(line.startswith(job) and " finished " in line and "6/6 downloaded" in line
               for line in table.splitlines()), table


def _manifest(cluster, job, path):
    result = cluster.producer("results", job, "--manifest", str(path))
    assert result.returncode == 1, result.stdout + result.stderr  # cancelled URLs are not downloaded ones
    return path


def test_the_reconciler_never_republishes_a_cancelled_job(cluster):
    """A cancelled job's URL whose worker vanished (lease run out) ends cancelled; nothing is published again."""
    ledger = Ledger(cluster.backend(), 3600)
    job = f"test-reconcile-{uuid.uuid4().hex[:8]}"
    ledger.create(job, {"input": "test"}, [(i, f"http://127.0.0.1:9/{i}", f"f{i}", None, {}) for i in range(3)])
    pipe = ledger.r.pipeline(transaction=True)
    ledger.mark_queued(pipe, job, [0, 1, 2])
    pipe.execute()
    ledger.transition(job, 0, STARTED, lease=0.001)  # running, then its worker is lost
    ledger.transition(job, 1, RETRYING, lease=0.001)
    assert ledger.cancel(job, 3) == 2  # the retrying and the queued one; the running one is left to its worker
    time.sleep(0.05)
    before = cluster.broker().llen(QUEUE)
    assert Reconciler(app, ledger, cluster.broker()).heal(job, ledger.counts(job)) == 0
    counts = ledger.counts(job)
    assert counts["cancelled"] == 3 and counts["started"] == 0 and counts["queued"] == 0
    assert cluster.broker().llen(QUEUE) == before
    assert ledger.overdue(job, 10) == []


def test_a_cancel_while_the_job_is_being_enqueued_keeps_its_urls_cancelled(cluster):
    """The producer marks a batch queued after publishing it: a URL cancelled meanwhile stays cancelled, and the
    counters still add up to the job's total."""
    ledger = Ledger(cluster.backend(), 3600)
    job = f"test-race-{uuid.uuid4().hex[:8]}"
    ledger.create(job, {"input": "test"}, [(i, f"http://127.0.0.1:9/{i}", f"f{i}", None, {}) for i in range(4)])
    pipe = ledger.r.pipeline(transaction=True)
    ledger.mark_queued(pipe, job, [0, 1])
    pipe.execute()
    assert ledger.cancel(job, 4) == 4  # 2 queued, 2 not yet published
    pipe = ledger.r.pipeline(transaction=True)
    ledger.mark_queued(pipe, job, [2, 3])  # the producer's next batch lands after the cancel
    pipe.execute()
    counts = ledger.counts(job)
    assert counts["cancelled"] == 4 and counts["queued"] == 0 and counts["published"] == 4
    assert ledger.transition(job, 3, STARTED, lease=60) == CANCELLED  # its message is skipped
    assert ledger.counts(job) == counts
