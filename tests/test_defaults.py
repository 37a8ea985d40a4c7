"""The default configuration: a worker started with no flags is a threads pool of 32, `-P prefork` still means
prefork, a host gets 8 connections at first and more while it keeps up, task events flow only once someone
(Flower) asks for them, and no STARTED result is stored."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from bench.realparts.servers import RedisServer, Worker
from tasks.app import pool_on_command_line
from tasks.config import THREADS_CONCURRENCY, Settings, default_concurrency
from tasks.hostlimit import HostKeys
from tasks.ledger import DONE, STARTED, Ledger
from tests.conftest import ROOT, Cluster, job_id_of, write_list

README_WORKER = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO"]


@pytest.mark.parametrize(("argv", "pool"), [
    (["celery", "-A", "tasks", "worker"], None),
    (["celery", "-A", "tasks", "worker", "-P", "prefork", "-c", "2"], "prefork"),
    (["celery", "-A", "tasks", "worker", "--pool", "threads"], "threads"),
    (["celery", "-A", "tasks", "worker", "--pool=solo"], "solo"),
    (["celery", "-A", "tasks", "worker", "-Pprefork"], "prefork"),
    (["celery", "-A", "tasks", "worker", "-P"], None),
])
def test_pool_named_on_the_command_line_is_found(argv, pool):
    assert pool_on_command_line(argv) == pool


def test_default_threads_match_the_per_host_cap_and_prefork_is_one_process_per_core():
    assert default_concurrency("threads", 8) == 8
    assert default_concurrency("threads", 0) == THREADS_CONCURRENCY  # no cap: as many as pay off
    assert default_concurrency("threads", 1000) == THREADS_CONCURRENCY
    assert default_concurrency("threads", 50, processes=2) == 50  # local mode: 25 + 25, the per-host ceiling
    assert default_concurrency("threads", 0, processes=2) == 2 * THREADS_CONCURRENCY
    assert default_concurrency("prefork", 8) == (os.cpu_count() or 2)


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A Redis of this module's own: its workers are the only consumers and events go to no other test."""
    server = RedisServer(tmp_path_factory.mktemp("redis-defaults")).start()
    try:
        yield Cluster(server, tmp_path_factory.mktemp("downloads-defaults"))
    finally:
        server.stop()


@pytest.fixture(scope="module")
def default_worker(own: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """`celery -A tasks worker --loglevel=INFO` exactly as the README's cluster section starts it."""
    w = Worker(own.env, name="unused", log=tmp_path_factory.mktemp("logs") / "w.log", cwd=ROOT)
    w.argv = list(README_WORKER)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def _client(own: Cluster) -> Celery:
    return Celery(broker=own.env["CELERY_BROKER_URL"], backend=own.env["CELERY_RESULT_BACKEND"])


def test_worker_without_flags_runs_the_threads_pool_and_p_prefork_still_forks(own, default_worker, tmp_path):
    stats = _client(own).control.inspect(timeout=5).stats() or {}
    assert len(stats) == 1, stats
    pool = next(iter(stats.values()))["pool"]
    assert "thread" in pool["implementation"] and pool["max-concurrency"] == THREADS_CONCURRENCY == 32
    assert Settings().per_host == 50
    assert default_worker.children() == []  # one process: no pool children

    with Worker(own.env, name="forked", concurrency=2, pool="prefork", log=tmp_path / "p.log", cwd=ROOT) as forked:
        deadline = time.monotonic() + 10
        while len(forked.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(forked.children()) == 2  # Celery would have taken the configured threads pool over -P prefork


class EventLog(threading.Thread):
    """Every Celery event the workers publish on the broker, by type, as a monitor such as Flower sees them."""

    def __init__(self, broker: str) -> None:
        super().__init__(daemon=True)
        self.app = Celery(broker=broker)
        self.events: list[dict] = []
        self.receiver = None

    def run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def stop(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.join(10)

    def task_events(self, job: str) -> set[str]:
        return {e["type"] for e in list(self.events) if e["type"].startswith("task-")
                and str(e.get("uuid", "")).startswith(job)}

    def wait_for(self, predicate, timeout: float = 15) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.1)
        return predicate()


def _run_job(own: Cluster, origin, tmp_path: Path, name: str) -> str:
    lines = []
    for i in range(3):
        origin.add(f"/{name}/{i}.bin", bytes([i]) * 1000)
        lines.append(origin.url(f"/{name}/{i}.bin"))
    result = own.producer(str(write_list(tmp_path / f"{name}.txt", lines)), "-d", name)
    assert result.returncode == 0, result.stdout + result.stderr
    return job_id_of(result.stdout)


def test_task_events_flow_only_after_enable_events_as_flower_sends_it(own, default_worker, origin, tmp_path):
    log = EventLog(own.env["CELERY_BROKER_URL"])
    log.start()
    try:
        # Worker heartbeats still flow (Flower's worker list needs them): they also show the receiver listens.
        assert log.wait_for(lambda: any(e["type"] == "worker-heartbeat" for e in list(log.events)))
        quiet = _run_job(own, origin, tmp_path, "quiet")
        time.sleep(1)  # what a worker sends is buffered briefly
        assert log.task_events(quiet) == set()

        # Flower (enable_events, on by default) sends exactly this to every worker every 5 s.
        replies = _client(own).control.enable_events(reply=True, timeout=5)
        assert replies and all("ok" in next(iter(r.values())) for r in replies)
        watched = _run_job(own, origin, tmp_path, "watched")
        assert log.wait_for(lambda: {"task-received", "task-started", "task-succeeded"} <= log.task_events(watched))
    finally:
        _client(own).control.disable_events(reply=True, timeout=5)
        log.stop()


def test_a_download_is_started_in_the_ledger_and_has_no_celery_result_before_or_after(own, default_worker, origin,
                                                                                    tmp_path):
    origin.add("/slow.bin", b"s" * 5000, delay=2)  # below the tests' read timeout (3 s): one attempt
    result = own.producer(str(write_list(tmp_path / "slow.txt", [origin.url("/slow.bin")])), "-d", "slow",
                          "--no-wait")
    assert result.returncode == 0, result.stderr
    job = job_id_of(result.stdout)
    backend = own.backend()
    ledger = Ledger(backend, 3600)

    deadline = time.monotonic() + 15
    while ledger.state(job, 0) != STARTED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ledger.state(job, 0) == STARTED
    assert backend.get(f"celery-task-meta-{job}-0") is None  # no STARTED result: the ledger already says it

    deadline = time.monotonic() + 15
    while ledger.state(job, 0) != DONE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ledger.state(job, 0) == DONE
    assert backend.get(f"celery-task-meta-{job}-0") is None  # nor a SUCCESS one: the ledger's record is kept
    assert (ledger.record(job, 0) or {})["bytes"] == 5000


def test_a_host_gets_8_connections_at_first_and_more_while_it_keeps_up(own, default_worker, origin, tmp_path):
    """All per-host defaults (ceiling 50, first window 8) and a worker with no flags (32 threads): the first 8
    downloads run 8 at once at most; once the host served a full window the window doubles, up to the worker's
    32 threads. A fixed cap of 8 would keep max_concurrent at 8; no cap would open 32 at once from the start."""
    # (0.3 s per URL is a slow origin: the slots stay in use long enough for the window to fill)
    own.backend().delete(HostKeys("127.0.0.1").stats)  # a window of this host from an earlier test starts over
    n = 150
    for i in range(n):
        origin.add(f"/window/{i}.bin", bytes([i % 256]) * 2000, delay=0.3)
    lines = [origin.url(f"/window/{i}.bin") for i in range(n)]
    pushes = own.broker().info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)
    started = time.monotonic()
    result = own.producer(str(write_list(tmp_path / "window.txt", lines)), "-d", "window", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # the threads waiting while the window grew waited in place: no task went back to the queue with a countdown
    # guessed from the first window (which left a tail of URLs idle for seconds after the rest was done)
    assert own.broker().info("commandstats")["cmdstat_lpush"]["calls"] - pushes == n
    print(f"\n{n} URLs of 0.3 s each from one host, defaults: {time.monotonic() - started:.1f} s, "
          f"at most {origin.max_concurrent} at once")
    levels = [r.concurrent for r in origin.requests]
    assert len(levels) == n
    # requests 1-8 open the window; 9-15 replace the first 7 served; the 8th served one doubles the window
    assert max(levels[:15]) <= 8
    # 8, 16, then 32: every thread of the worker in flight; threads that found the window full looked again as it
    # grew (they used to sleep for a turn guessed from the first window, and max_concurrent stayed near 22)
    assert origin.max_concurrent == THREADS_CONCURRENCY
    assert len(list((own.downloads / "window").glob("*.bin"))) == n


def test_one_command_starts_a_worker_per_core_and_every_one_downloads(origin, tmp_path):
    """`python -m tasks.worker --per-core` (the compose file's and the systemd unit's command): one process forks
    a worker per core it may use, named w1@%h, w2@%h ..., and each of them downloads a share of a job."""
    import subprocess

    from tasks.worker import cores

    server = RedisServer(tmp_path / "redis").start()
    cluster = Cluster(server, tmp_path / "downloads")
    log = tmp_path / "per-core.log"
    n = cores()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tasks.worker", "--per-core", "-c", "1"], env=cluster.env,
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while log.read_bytes().count(b" ready.") < n and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert log.read_bytes().count(b" ready.") == n, log.read_text(errors="replace")[-3000:]
        for i in range(4 * n):
            origin.add(f"/pc{i}.bin", b"p" * 20_000, rate=40_000)  # half a second each
        listing = write_list(tmp_path / "urls.txt", [origin.url(f"/pc{i}.bin") for i in range(4 * n)])
        done = cluster.producer(str(listing), "-d", "pc")
        assert done.returncode == 0, done.stderr
        ledger = Ledger(cluster.backend(), 3600)
        job = job_id_of(done.stderr + done.stdout)
        workers = {ledger.record(job, i)["worker"].split("@")[0] for i in range(4 * n)}
        assert workers == {f"w{i}" for i in range(1, n + 1)}
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        server.stop()
