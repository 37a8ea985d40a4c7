"""Real parts for end-to-end tests: a Redis server, `celery worker` processes and HTTP origins on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from tests.support.inprocess import InProcessWorker

ROOT = Path(__file__).resolve().parent.parent

# Workers may reach 127.0.0.1 only; 127.0.0.2 serves as "an address the policy refuses".
TEST_SETTINGS = {
    "FLEETFETCH_ALLOW_NETWORKS": "127.0.0.1/32",
    "FLEETFETCH_RESOLVE": "refused.test:0:127.0.0.2,allowed.test:0:127.0.0.1",
    "FLEETFETCH_MAX_ATTEMPTS": "3",
    "FLEETFETCH_BACKOFF_BASE": "0.1",
    "FLEETFETCH_BACKOFF_CAP": "0.5",
    "FLEETFETCH_MAX_RETRY_AFTER": "5",
    "FLEETFETCH_CONNECT_TIMEOUT": "3",
    "FLEETFETCH_READ_TIMEOUT": "3",
    "FLEETFETCH_NO_FSYNC": "1",
}


# Tests that kill things shorten how soon a lost URL is noticed (URL lease 4 s instead of 60 s, a sweep every second
# instead of 15 s) only to stay fast. The visibility timeout and the time limit are never shortened: recovery must not
# depend on them. tests/test_recovery.py also runs every fault with all shipped settings.
FAST_HEAL = {"FLEETFETCH_URL_LEASE": "4", "FLEETFETCH_SWEEP_INTERVAL": "1"}


# `FLEETFETCH_STOCK=1 python -m pytest ...` runs the tests' workers and producers on kombu's and urllib3's own
# paths (tasks/kombu_redis.py, tasks/urllib3_hooks.py): .ci/run proves the recovery tests on them so.
STOCK = {"FLEETFETCH_STOCK": os.environ["FLEETFETCH_STOCK"]} if os.environ.get("FLEETFETCH_STOCK") else {}


# The smoke tier (`-m smoke`): a real job of each kind end to end. .ci/run runs it on the lowest versions the
# declared ranges allow, on the newest Python, and on the stock path (FLEETFETCH_STOCK=1).
SMOKE = {
    "test_cluster.py::test_job_downloads_every_file_and_records_each_url",
    "test_cluster.py::test_failures_end_as_failed_records_with_reasons_and_exit_1",
    "test_local_mode.py::test_local_mode_downloads_everything_and_leaves_no_processes",
    "test_local_mode.py::test_a_local_job_outlives_its_command_ctrl_c_then_status_results_and_resume",
    "test_fetching.py::test_transient_statuses_are_retried_and_retry_after_is_honoured",
    "test_fetching.py::test_cut_connection_resumes_with_range_and_if_range",
    "test_jobs.py::test_cancel_ends_every_url_cancelled_leaves_no_temp_files_and_resume_finishes_it",
    "test_recovery.py::test_a_worker_host_lost_outright_is_healed_by_the_other_worker",
    "test_recovery.py::test_redis_restarted_several_times_while_tasks_run",
    "test_https.py::test_a_certificate_for_another_name_or_from_an_untrusted_ca_fails_the_url_and_leaves_no_file",
    "test_flower.py::test_flower_requires_credentials_and_shows_workers_and_redacted_failures",
    "test_dependencies.py::test_a_job_runs_on_the_patched_and_on_the_stock_transport",
    "test_dependencies.py::test_the_stock_http_path_connects_to_the_checked_address_and_names_the_host",
}


# The fast tier (`python -m pytest -m fast`, about a minute: what to run before each commit): pure functions, Lua
# scripts on a real Redis and jobs on an in-process worker (`in_process`), marked `fast` per module or per test.
# Worker and producer processes, chaos and deploys are the full tier (CI runs both): a fast test that asks for a
# fixture starting them is refused at collection.
PROCESS_FIXTURES = {"cluster", "worker", "workers", "chaos", "flower", "own", "default_worker", "hostile",
                    "https_worker", "site", "network", "pair"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = [item.nodeid for item in items if item.get_closest_marker("fast")
            and PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if slow:
        raise pytest.UsageError(f"tests marked fast ask for workers or a producer: {slow}")
    found = set()
    for item in items:
        name = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        if name in SMOKE:
            item.add_marker(pytest.mark.smoke)
            found.add(name)
    files = {item.path.name for item in items}
    lost = {n for n in SMOKE - found if n.split("::")[0] in files}
    if lost:  # a renamed test must not drop out of the smoke tier unnoticed
        raise pytest.UsageError(f"tests/conftest.py SMOKE names tests that do not exist: {sorted(lost)}")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "FLEETFETCH_"))}
    env.update(TEST_SETTINGS, **STOCK, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Cluster:
    """A Redis server plus the environment a worker and the producer share."""

    def __init__(self, server: RedisServer | None, downloads: Path, urls: tuple[str, str] | None = None) -> None:
        self.server = server  # type: ignore[assignment]
        self.downloads = downloads
        broker, backend = urls or (server.url(0), server.url(1))  # type: ignore[union-attr]
        self.env = base_env(CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND=backend, FLEETFETCH_DIR=str(downloads))

    def producer(self, *args: str, stdin: str | None = None, timeout: float = 120,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "producer", *args], env=env or self.env, input=stdin,
                              capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)

    def producer_async(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "producer", *args], env=self.env, cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def broker(self) -> redis.Redis:
        return self.server.client(0)

    def backend(self) -> redis.Redis:
        return self.server.client(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _hosts_start_afresh(request: pytest.FixtureRequest) -> None:
    """A test on the session's Redis starts with no per-host state: every origin is 127.0.0.1, and a window halved
    by one test's 503s or timeouts (or grown by another's full windows) would change the next test's concurrency
    for an hour. (Module-scoped Redis servers are shared by a module's tests on purpose.)"""
    if "redis_server" in request.fixturenames:
        backend = request.getfixturevalue("redis_server").client(1)
        stale = list(backend.scan_iter("ff:host:*")) + ["ff:paused"]
        backend.delete(*stale)


@pytest.fixture
def in_process(redis_server: RedisServer, tmp_path: Path) -> Callable[..., InProcessWorker]:
    """Makes workers that run in the test's process (tests/support/inprocess.py) with TEST_SETTINGS and the given
    FLEETFETCH_* variables, on the session's Redis: databases 4 and 5, apart from the subprocess workers' queue
    and their hosts' state. Files go to tmp_path/downloads."""
    backend = redis_server.client(5)
    backend.delete(*backend.scan_iter("ff:host:*"), "ff:paused")  # as _hosts_start_afresh does for database 1

    def make(**extra: str) -> InProcessWorker:
        return InProcessWorker({**TEST_SETTINGS, **STOCK, "CELERY_BROKER_URL": redis_server.url(4),
                                "CELERY_RESULT_BACKEND": redis_server.url(5),
                                "FLEETFETCH_DIR": str(tmp_path / "downloads"), **extra})

    return make


@pytest.fixture(scope="session")
def cluster(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Cluster:
    return Cluster(redis_server, tmp_path_factory.mktemp("downloads"))


@pytest.fixture(scope="session")
def worker(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    log = tmp_path_factory.mktemp("logs") / "worker.log"
    w = Worker(cluster.env, name="w1", concurrency=4, log=log, cwd=ROOT).start()
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture
def origin() -> Iterator[Origin]:
    o = Origin("127.0.0.1").start()
    try:
        yield o
    finally:
        o.stop()


@pytest.fixture
def chaos(tmp_path: Path) -> Iterator[Cluster]:
    """An own Redis (AOF, so it can be restarted) for a test that kills things; shipped settings but FAST_HEAL."""
    server = RedisServer(tmp_path / "redis").start()
    cluster = Cluster(server, tmp_path / "downloads")
    cluster.env.update(FAST_HEAL)
    try:
        yield cluster
    finally:
        server.stop()


class Workers:
    """Workers of one test, all stopped at the end whatever happens."""

    def __init__(self, cluster: Cluster, logs: Path) -> None:
        self.cluster, self.logs, self.all = cluster, logs, list[Worker]()

    def start(self, name: str, concurrency: int | None = 2, pool: str | None = "prefork") -> Worker:
        w = Worker(self.cluster.env, name=name, concurrency=concurrency, pool=pool, log=self.logs / f"{name}.log",
                   cwd=ROOT)
        self.all.append(w)
        return w.start()

    def stop(self) -> None:
        for w in self.all:
            w.stop()


@pytest.fixture
def workers(chaos: Cluster, tmp_path: Path) -> Iterator[Workers]:
    ws = Workers(chaos, tmp_path)
    try:
        yield ws
    finally:
        ws.stop()


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def job_id_of(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("job "):
            return line.split()[1].rstrip(":")
    raise AssertionError(f"no job id in output:\n{output}")


def read_manifest(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
