"""Nothing lost under the shipped settings: URL leases and the reconciler bring every URL home.

The visibility timeout and the task time limit are never shortened here. Most tests shorten the URL lease and the
sweep interval (FAST) only so that each heals in seconds instead of about a minute; the last test suffers every
fault in one job with all shipped settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

import pytest
from celery import Celery

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer
from tasks import feed
from tasks.config import QUEUE, Settings
from tasks.ledger import FINAL, QUEUED, STARTED, Ledger
from tasks.message import Entry, Message, Options
from tests.conftest import Cluster, Workers, job_id_of, write_list
from tests.test_chaos import CLEAN, audit, finish, serve, start_job, wait_for_requests


def publisher(broker: str) -> Celery:
    """An app that publishes to `broker` as the producer does (the module-level app may point elsewhere)."""
    return Celery("test-publisher", broker=broker, set_as_current=False, config_source={
        "task_default_queue": QUEUE, "task_serializer": "json", "accept_content": ["json"]})


def healed(report: dict[str, int]) -> dict[str, int]:
    return {k: report[k] for k in CLEAN}


def enqueue(cluster: Cluster, tmp_path: Path, origin: Origin, bodies: dict[str, bytes], sub: str) -> str:
    """Enqueue with --no-wait: the producer is gone, so only the workers can heal the job."""
    listing = write_list(tmp_path / f"{sub}.txt", [origin.url(p) for p in bodies])
    result = cluster.producer(str(listing), "-d", sub, "--no-wait")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def wait_finished(cluster: Cluster, job: str, timeout: float) -> float:
    """Seconds until every URL of `job` has its final record (AssertionError after `timeout`)."""
    ledger, started = Ledger(cluster.backend(), 3600), time.monotonic()
    while time.monotonic() - started < timeout:
        counts = ledger.counts(job)
        if sum(counts[s] for s in FINAL) >= int(ledger.meta(job)["total"]):
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"job {job} not finished after {timeout} s: {ledger.counts(job)}")


def test_a_worker_host_lost_outright_is_healed_by_the_other_worker(chaos, workers, origin, tmp_path):
    bodies = serve(origin, 12, size=100_000, rate=200_000)  # 0.5 s each
    doomed = workers.start("doomed", concurrency=3)
    job = enqueue(chaos, tmp_path, origin, bodies, "lost")
    wait_for_requests(origin, 3)
    doomed.kill()  # its whole process group, never replaced: its URLs are held in Redis's unacked for 2 hours
    workers.start("survivor", concurrency=2)
    heal = wait_finished(chaos, job, timeout=90)
    print(f"worker host lost: healed in {heal:.1f} s (URL lease 4 s, sweep 1 s)")
    report = audit(chaos, chaos.downloads / "lost", job, bodies, origin)
    assert healed(report) == CLEAN, report
    records = [json.loads(line) for line in chaos.producer("results", job).stdout.splitlines()]
    assert any(r.get("redeliveries") for r in records)


def test_redis_restarted_several_times_while_tasks_run(chaos, workers, origin, tmp_path):
    bodies = serve(origin, 20, size=150_000, rate=150_000)  # 1 s each
    workers.start("r1", concurrency=3)
    proc = start_job(chaos, tmp_path, origin, bodies, "restarts")
    wait_for_requests(origin, 3)
    for _ in range(3):
        time.sleep(1.2)  # appendfsync everysec
        chaos.server.stop()
        time.sleep(2)
        chaos.server.start()
    out = finish(proc, timeout=150)
    report = audit(chaos, chaos.downloads / "restarts", job_id_of(out), bodies, origin)
    assert healed(report) == CLEAN, report


def test_pool_child_killed_while_redis_is_down(chaos, workers, origin, tmp_path):
    bodies = serve(origin, 8, size=200_000, rate=100_000)  # 2 s each
    w = workers.start("kd", concurrency=2)
    proc = start_job(chaos, tmp_path, origin, bodies, "down")
    wait_for_requests(origin, 2)
    time.sleep(0.5)
    chaos.server.stop()
    kids = w.children()
    assert kids
    os.kill(kids[0].pid, signal.SIGKILL)
    time.sleep(3)
    chaos.server.start()
    out = finish(proc, timeout=150)
    report = audit(chaos, chaos.downloads / "down", job_id_of(out), bodies, origin)
    assert healed(report) == CLEAN, report


def test_queue_deleted_by_hand_mid_job(chaos, workers, origin, tmp_path):
    bodies = serve(origin, 30, size=50_000, rate=200_000)
    workers.start("dq", concurrency=2)
    job = enqueue(chaos, tmp_path, origin, bodies, "deleted")
    wait_for_requests(origin, 2)
    assert chaos.broker().delete(QUEUE) == 1  # every message not yet taken by the worker is gone
    heal = wait_finished(chaos, job, timeout=90)
    print(f"queue deleted: healed in {heal:.1f} s (sweep 1 s)")
    report = audit(chaos, chaos.downloads / "deleted", job, bodies, origin)
    assert healed(report) == CLEAN, report


def test_a_stale_message_delivered_after_the_url_finished_is_a_no_op(chaos, workers, origin, tmp_path):
    bodies = serve(origin, 2, size=10_000)
    workers.start("st", concurrency=1)
    out = finish(start_job(chaos, tmp_path, origin, bodies, "stale"))
    job = job_id_of(out)
    before = len(origin.requests)
    records = chaos.producer("results", job).stdout
    ledger = Ledger(chaos.backend(), 3600)
    stale = Message.of(job, Entry(0, origin.url("/c0.bin"), "c0.bin"), Options())
    feed.publish(publisher(chaos.env["CELERY_BROKER_URL"]), ledger, job, [stale], mark=False)
    deadline = time.monotonic() + 20
    while chaos.broker().llen(QUEUE) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert chaos.broker().llen(QUEUE) == 0  # consumed
    assert len(origin.requests) == before  # and nothing downloaded
    assert chaos.producer("results", job).stdout == records


@pytest.mark.fast
@pytest.mark.parametrize("limit", [Settings.max_redeliveries, 2])
def test_a_url_whose_worker_keeps_dying_fails_after_max_redeliveries(redis_server, limit):
    """The reconciler alone, against a real Redis: an overdue URL is republished until the limit (the settings
    passed in: the shipped one, then another), then failed."""
    ledger = Ledger(redis_server.client(1), 3600)
    job = f"poison-{time.time_ns()}"
    ledger.create(job, {"opts": {}}, [(0, "http://127.0.0.1:9/p", "p", None)])
    reconciler = feed.Reconciler(publisher(redis_server.url(2)), ledger, None, Settings(max_redeliveries=limit))
    for n in range(1, limit + 2):
        ledger.transition(job, 0, STARTED, lease=0)  # started, and its lease has run out at once
        time.sleep(0.01)
        ledger.r.delete(feed.LOCK_KEY)
        healed = reconciler.heal(job, ledger.counts(job))
        if n <= limit:
            assert healed == 1 and ledger.state(job, 0) == QUEUED
    assert healed == 0
    record = ledger.record(job, 0)
    assert record is not None and record["status"] == "failed" and f"lost {limit} times" in record["reason"]
    assert redis_server.client(2).llen(QUEUE) == limit
    redis_server.client(2).delete(QUEUE)


def test_a_backend_that_comes_back_empty_stops_the_producer_with_what_to_do(chaos, workers, origin, tmp_path):
    bodies = serve(origin, 6, size=200_000, rate=100_000)
    workers.start("em", concurrency=1)
    proc = start_job(chaos, tmp_path, origin, bodies, "empty")
    wait_for_requests(origin, 1)
    chaos.server.stop()
    for f in chaos.server.dir.rglob("*.aof*"):
        if f.is_file():
            f.unlink()
    appendonly = chaos.server.dir / "appendonlydir"
    if appendonly.exists():
        for f in appendonly.iterdir():
            f.unlink()
    chaos.server.start()  # empty: no queue, no ledger
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, out + err
    assert "no longer has job" in err and "run the list again" in err and "Traceback" not in err


@pytest.mark.timeout(420)
def test_every_fault_heals_with_all_shipped_settings(tmp_path, origin):
    """One job, every fault, nothing shortened: a worker host lost (started with no flags, as the README says),
    the queue deleted, a pool child of a prefork worker killed while Redis is down. Only what reaching a loopback
    origin needs is set (FLEETFETCH_ALLOW_NETWORKS)."""
    with RedisServer(tmp_path / "redis") as server:
        cluster = Cluster(server, tmp_path / "downloads")
        keep = ("FLEETFETCH_ALLOW_NETWORKS", "FLEETFETCH_DIR")
        cluster.env = {k: v for k, v in cluster.env.items() if not k.startswith("FLEETFETCH_") or k in keep}
        crew = Workers(cluster, tmp_path)
        try:
            bodies = serve(origin, 40, size=150_000, rate=150_000)  # 1 s each
            doomed = crew.start("doomed", concurrency=None, pool=None)  # as the README starts it: threads
            steady = crew.start("steady", concurrency=2, pool="prefork")  # a pool process to kill below
            job = enqueue(cluster, tmp_path, origin, bodies, "all")
            wait_for_requests(origin, 4)
            faulted = time.monotonic()
            doomed.kill()  # host lost: 2 URLs running there, its reserved messages held in unacked for 2 hours
            time.sleep(1)
            cluster.broker().delete(QUEUE)  # every waiting message gone
            time.sleep(1)
            server.stop()
            kids = steady.children()
            assert kids
            os.kill(kids[0].pid, signal.SIGKILL)  # a pool child dies while Redis is down
            time.sleep(3)
            server.start()
            # A worker may exit on the connection loss (kombu, seen here: "Unrecoverable error: AttributeError
            # ... 'hostname'" while acknowledging); its supervisor starts it again, as the shipped systemd unit
            # (Restart=on-failure), compose (restart: unless-stopped) and Kubernetes do. The doomed one stays dead.
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                if steady.proc is not None and steady.proc.poll() is not None:
                    print(f"steady worker exited ({steady.proc.returncode}): restarted, as its supervisor would")
                    steady = crew.start(f"steady{int(time.monotonic())}", concurrency=2, pool="prefork")
                with contextlib.suppress(AssertionError):
                    wait_finished(cluster, job, timeout=2)
                    break
            wait_finished(cluster, job, timeout=1)  # fails the test if the job is not whole by then
            print(f"every fault, shipped settings: job whole {time.monotonic() - faulted:.0f} s after the first fault")
            report = audit(cluster, cluster.downloads / "all", job, bodies, origin)
            assert healed(report) == CLEAN, report
        finally:
            crew.stop()
