"""A task message is not trusted: whoever can write to the broker (or use Flower's async-apply) can send one.

A message that names a job only points at one of its URLs: the worker takes the URL, name, directory and options
from the ledger. A message off the contract fails with one record and leaves every other counter alone; a payload
the broker transport cannot read is dropped with a log line, and the worker carries on.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from tasks.config import QUEUE, TASK_NAME
from tasks.ledger import Ledger
from tests.conftest import ROOT, Cluster, job_id_of, write_list

TOKEN = "Bearer tok-Zq7-secret"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Worker]]:
    """An own Redis and worker: the worker logs each task's id (DEBUG), and no other worker takes the messages."""
    tmp = tmp_path_factory.mktemp("messages")
    server = RedisServer(tmp / "redis").start()
    try:
        c = Cluster(server, tmp / "downloads")
        with Worker(c.env, name="msgs", concurrency=2, pool="threads", log=tmp / "w.log", cwd=ROOT,
                    extra_args=("--loglevel=DEBUG",)) as w:
            yield c, w
    finally:
        server.stop()


def _send(cluster: Cluster, args: Any, kwargs: Any, body: Any = None) -> str:
    """Publish a task message by hand, as a broker user would (`body` instead of [args, kwargs, {}]); returns its
    task id."""
    task_id = f"forged-{uuid.uuid4().hex[:8]}"
    with Connection(cluster.env["CELERY_BROKER_URL"]) as conn:
        conn.Producer(serializer="json").publish(
            [args, kwargs, {}] if body is None else body, routing_key=QUEUE, serializer="json",
            headers={"task": TASK_NAME, "id": task_id, "lang": "py", "argsrepr": "", "kwargsrepr": ""})
    return task_id


def _handled(worker: Worker, task_id: str, timeout: float = 20) -> str:
    """The worker's log lines about task `task_id`, once it has finished (succeeded or raised)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in worker.log_text().splitlines() if task_id in line]
        if any(w in line for line in lines for w in (" succeeded ", " raised ", " failed ")):
            return "\n".join(lines)
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} not finished:\n{worker.log_text()[-3000:]}")


def _counts(cluster: Cluster, job: str) -> dict[str, int]:
    return Ledger(cluster.backend(), 3600).counts(job)


def _job(cluster: Cluster, origin: Origin, tmp_path: Path, sub: str) -> str:
    """A finished job of one URL with a secret header: `sub/private.txt`."""
    origin.add("/private.txt", b"private bytes")
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", [origin.url("/private.txt")])), "-d", sub,
                              "-H", f"Authorization: {TOKEN}")
    assert result.returncode == 0, result.stdout + result.stderr
    return job_id_of(result.stdout)


def test_a_forged_message_naming_a_job_cannot_send_its_secrets_elsewhere(site, origin, tmp_path):
    cluster, worker = site
    job = _job(cluster, origin, tmp_path, "forged")
    before = _counts(cluster, job)
    with Origin("127.0.0.1").start() as attacker:
        attacker.add("/steal", b"attacker bytes")
        for index in (0, 1, 7):  # its one URL, and indexes outside the job
            _handled(worker, _send(cluster, [attacker.url("/steal"), "stolen.txt"],
                                   {"job": job, "index": index, "opts": {"secret_headers": True, "subdir": "x"}}))
        assert attacker.requests == []
    assert len(origin.requests_for("/private.txt")) == 1  # index 0 is done: nothing ran again
    assert not (cluster.downloads / "forged" / "stolen.txt").exists() and not (cluster.downloads / "x").exists()
    assert _counts(cluster, job) == before


def test_a_message_that_names_a_job_runs_the_url_the_ledger_has(site, origin, tmp_path):
    cluster, worker = site
    origin.add("/slow.txt", b"ledger bytes", delay=3)
    listing = write_list(tmp_path / "urls.txt", [origin.url("/slow.txt")])
    result = cluster.producer(str(listing), "-d", "pointed", "-H", f"Authorization: {TOKEN}", "--no-wait")
    assert result.returncode == 0, result.stdout + result.stderr
    job = job_id_of(result.stdout)
    with Origin("127.0.0.1").start() as attacker:
        attacker.add("/steal", b"attacker bytes")
        # A second message for the job's URL, with another URL, name and options: only the pointer is taken.
        _send(cluster, [attacker.url("/steal"), "stolen.txt"],
              {"job": job, "index": 0, "opts": {"secret_headers": True, "force": True, "attempt": 1}})
        deadline = time.monotonic() + 30
        while _counts(cluster, job)["done"] < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        assert attacker.requests == []
    assert (cluster.downloads / "pointed" / "slow.txt").read_bytes() == b"ledger bytes"
    assert all(r.headers["Authorization"] == TOKEN for r in origin.requests_for("/slow.txt"))
    assert _counts(cluster, job)["done"] == 1 and _counts(cluster, job)["failed"] == 0


def test_a_message_without_a_job_never_replaces_a_verified_file(site, origin, tmp_path):
    cluster, worker = site
    _job(cluster, origin, tmp_path, "adhoc")
    with Origin("127.0.0.1").start() as attacker:
        attacker.add("/private.txt", b"attacker bytes")
        log = _handled(worker, _send(cluster, [attacker.url("/private.txt"), "private.txt"],
                                     {"opts": {"subdir": "adhoc", "force": True}}))
    # Its name is another URL's: it fails, or (the name's claim) takes the hashed name; never the verified file.
    assert "Traceback" not in log
    assert (cluster.downloads / "adhoc" / "private.txt").read_bytes() == b"private bytes"


@pytest.mark.parametrize("args,kwargs", [
    (["URL", "f.txt"], {"job": "JOB", "index": 0, "opts": "x"}),
    ([5, "f.txt"], {"job": "JOB", "index": 0}),
    (["URL", ["f.txt"]], {"job": "JOB", "index": 0}),
    (["URL", "f.txt"], {"job": "JOB", "index": "0"}),
    (["URL", "f.txt"], {"job": "JOB", "index": -1}),
    (["URL", "f.txt"], {"job": 5, "index": 0}),
    (["URL", "f.txt"], {"job": "JOB", "index": 0, "opts": {"resume": {"etag": 5}}}),
    ([], {"job": "JOB", "index": 0}),
    (["URL", "f.txt", "JOB", 0, {}, "sixth"], {}),
    (["URL", "f.txt"], {"job": "JOB", "index": 0, "evil": 1}),
])
def test_a_malformed_message_fails_once_without_touching_other_counters(site, origin, tmp_path, args, kwargs):
    cluster, worker = site
    job = _job(cluster, origin, tmp_path, "malformed")
    before = _counts(cluster, job)
    args = [origin.url("/private.txt") if a == "URL" else a for a in args]
    kwargs = {k: job if v == "JOB" else v for k, v in kwargs.items()}
    log = _handled(worker, _send(cluster, args, kwargs))
    assert "the task message has a bad" in log and "Traceback" not in worker.log_text()
    assert _counts(cluster, job) == before


@pytest.mark.parametrize("payload", ["not json at all", "[1, 2]", '{"properties": {}}', "\udcff",
                                     '{"properties": {"delivery_tag": "t", "delivery_info": {}}, "headers": 5}'])
def test_an_unreadable_broker_payload_is_dropped_and_the_worker_carries_on(site, origin, tmp_path, payload):
    c, w = site
    c.broker().lpush(QUEUE, payload.encode("utf-8", "surrogateescape"))
    time.sleep(1)
    origin.add("/after.txt", b"after")
    result = c.producer(str(write_list(tmp_path / "urls.txt", [origin.url("/after.txt")])), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr + w.log_text()[-3000:]
    assert w.proc is not None and w.proc.poll() is None
    assert "dropped a message the broker transport cannot read" in w.log_text()


@pytest.mark.parametrize("body", [[5, 6, {}], [1, 2], "a string", [[], 5, {}], [[], {}, 7]])
def test_a_task_body_of_the_wrong_shape_fails_once_and_holds_nothing(site, origin, tmp_path, body):
    cluster, worker = site
    log = _handled(worker, _send(cluster, None, None, body=body))
    assert "the task message has a bad shape" in log
    origin.add("/next.txt", b"next")
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", [origin.url("/next.txt")])), "-d", "shape",
                              timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    time.sleep(1.5)  # a sweep or two: none may fail on what the message held
    assert "Sweep for lost URLs failed" not in worker.log_text()


def test_unreadable_messages_taken_in_a_batch_leave_nothing_unacknowledged(site, origin, tmp_path):
    c, w = site
    bad = json.dumps({"properties": {"delivery_tag": "t", "delivery_info": {}}, "headers": 5, "body": "abc"})
    line = "dropped a message the broker transport cannot read"
    before = w.log_text().count(line)
    c.broker().lpush(QUEUE, *[bad.replace('"t"', f'"bad-{i}"') for i in range(4)])  # one BRPOP'd, the rest taken
    deadline = time.monotonic() + 10
    while w.log_text().count(line) < before + 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert w.log_text().count(line) == before + 4
    assert w.proc is not None and w.proc.poll() is None
    assert c.broker().llen(QUEUE) == 0 and c.broker().hlen("unacked") == 0
