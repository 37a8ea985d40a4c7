"""The worker's health files with a real Redis and a real `celery worker`, read by the probes the manifests ship."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bench.realparts.servers import RedisServer, Worker
from tasks import heartbeat
from tests.conftest import ROOT, base_env

BEAT_S = 0.3  # FLEETFETCH_HEARTBEAT_INTERVAL for the test; the shipped default is 5 s


def shipped_probes() -> dict[str, list[str]]:
    """The worker Deployment's probe commands, exactly as written in deploy/k8s/worker.yaml."""
    worker = yaml.safe_load((ROOT / "deploy" / "k8s" / "worker.yaml").read_text())
    c = worker["spec"]["template"]["spec"]["containers"][0]
    return {"liveness": c["livenessProbe"]["exec"]["command"], "readiness": c["readinessProbe"]["exec"]["command"]}


def probe_passes(command: list[str], heartbeat: Path) -> bool:
    env = {"PATH": "/usr/bin:/bin", "FLEETFETCH_HEARTBEAT_FILE": str(heartbeat)}
    return subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0


def wait_for(condition: Callable[[], bool], what: str, worker: Worker, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s; worker log:\n{worker.log_text()[-3000:]}")
        time.sleep(0.1)


def assert_beating(heartbeat: Path, worker: Worker, beats: int = 3) -> None:
    """The file's mtime moves forward `beats` times."""
    for _ in range(beats):
        before = heartbeat.stat().st_mtime_ns
        wait_for(lambda b=before: heartbeat.stat().st_mtime_ns > b, "heartbeat file touched again", worker)


@pytest.fixture
def broker(tmp_path: Path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def test_worker_beats_through_a_redis_outage_and_is_ready_only_while_connected(broker, tmp_path):
    heartbeat = tmp_path / "fleetfetch-worker.alive"
    ready = Path(f"{heartbeat}.ready")
    env = base_env(CELERY_BROKER_URL=broker.url(0), CELERY_RESULT_BACKEND=broker.url(1),
                   FLEETFETCH_DIR=str(tmp_path / "downloads"), FLEETFETCH_HEARTBEAT_FILE=str(heartbeat),
                   FLEETFETCH_HEARTBEAT_INTERVAL=str(BEAT_S))
    probes = shipped_probes()
    worker = Worker(env, name="heartbeat", concurrency=1, log=tmp_path / "worker.log", cwd=ROOT)
    with worker:
        assert "heartbeat: touching" in worker.log_text()
        wait_for(ready.exists, "ready marker after connecting", worker)
        assert_beating(heartbeat, worker)
        assert probe_passes(probes["liveness"], heartbeat) and probe_passes(probes["readiness"], heartbeat)

        broker.stop()  # Redis outage: the worker stays alive, stops being ready, and is not restarted
        wait_for(lambda: not ready.exists(), "ready marker removed after losing the broker", worker)
        assert "Connection to broker lost" in worker.log_text()
        assert_beating(heartbeat, worker, beats=5)
        assert probe_passes(probes["liveness"], heartbeat)
        assert not probe_passes(probes["readiness"], heartbeat)
        assert worker.proc is not None and worker.proc.poll() is None

        broker.start()  # same port, same AOF: the consumer reconnects and is ready again
        wait_for(ready.exists, "ready marker after reconnecting", worker)
        assert probe_passes(probes["readiness"], heartbeat)
        assert_beating(heartbeat, worker)
    # Warm shutdown: no longer ready; the last heartbeat goes stale from here on.
    assert not ready.exists()
    stopped_at = heartbeat.stat().st_mtime_ns
    time.sleep(3 * BEAT_S)
    assert heartbeat.stat().st_mtime_ns == stopped_at


def test_worker_started_while_redis_is_down_is_alive_not_ready_and_drops_a_stale_marker(tmp_path):
    heartbeat = tmp_path / "fleetfetch-worker.alive"
    ready = Path(f"{heartbeat}.ready")
    ready.touch()  # left by a worker that was SIGKILLed (an emptyDir outlives a container restart)
    broker = RedisServer(tmp_path / "redis")  # its port is chosen, the server not started yet
    env = base_env(CELERY_BROKER_URL=broker.url(0), CELERY_RESULT_BACKEND=broker.url(1),
                   FLEETFETCH_DIR=str(tmp_path / "downloads"), FLEETFETCH_HEARTBEAT_FILE=str(heartbeat),
                   FLEETFETCH_HEARTBEAT_INTERVAL=str(BEAT_S))
    probes = shipped_probes()
    worker = Worker(env, name="early", concurrency=1, log=tmp_path / "worker.log", cwd=ROOT)
    # Worker.start() waits for "ready.", which needs the broker: start the same argv without waiting.
    with open(worker.log, "ab") as log:
        worker.proc = subprocess.Popen(worker.argv, env=worker.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(heartbeat.exists, "heartbeat file while the broker is down", worker)
        assert_beating(heartbeat, worker)
        wait_for(lambda: "Cannot connect to" in worker.log_text(), "a failed connection attempt", worker)
        assert not ready.exists()
        assert probe_passes(probes["liveness"], heartbeat) and not probe_passes(probes["readiness"], heartbeat)
        broker.start()
        wait_for(ready.exists, "ready marker once the broker is up", worker)
        assert probe_passes(probes["readiness"], heartbeat)
    finally:
        worker.stop()
        broker.stop()


def test_without_the_variable_the_worker_writes_no_health_files(broker, tmp_path):
    env = base_env(CELERY_BROKER_URL=broker.url(0), CELERY_RESULT_BACKEND=broker.url(1),
                   FLEETFETCH_DIR=str(tmp_path / "downloads"), FLEETFETCH_HEARTBEAT_INTERVAL=str(BEAT_S))
    worker = Worker(env, name="quiet", concurrency=1, log=tmp_path / "worker.log", cwd=tmp_path)
    with worker:
        pass
    assert "heartbeat" not in worker.log_text()
    assert not list(tmp_path.glob("*.alive*"))


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "60", "nan", "inf"])
def test_a_bad_interval_is_one_error_line(raw):
    with pytest.raises(SystemExit, match=r"^error: FLEETFETCH_HEARTBEAT_INTERVAL=.* unset it for the default 5$"):
        heartbeat._interval(raw)


def test_the_interval_defaults_to_5_seconds():
    assert heartbeat._interval("") == 5.0 and heartbeat._interval("0.5") == 0.5
