"""Several hosts on one machine: network namespaces joined by a bridge, addressed from 198.18.0.0/24.

broker (Redis), origin, worker-1, worker-2 and producer each live in their own namespace; traffic stays
inside them. Files go to one shared directory, as an NFS or RWX volume would provide.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.local import server_binary
from tests.conftest import FAST_HEAL, ROOT, base_env, write_list

NET = "198.18.0"  # the range reserved for network testing
HOSTS = {"broker": 1, "origin": 2, "w1": 3, "w2": 4, "prod": 5}
PREFIX = f"fft{os.getpid() % 10000}"


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=30)


class Network:
    """Namespaces `<prefix>-<host>` with one veth each into a bridge in `<prefix>-sw`."""

    def __init__(self) -> None:
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{PREFIX}-{host}"

    def up(self) -> Network:
        switch = self.ns("sw")
        sh("ip", "netns", "add", switch)
        self.made.append(switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        for host, n in HOSTS.items():
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "link", "add", f"{PREFIX}v{n}", "type", "veth", "peer", "name", f"{PREFIX}p{n}")
            sh("ip", "link", "set", f"{PREFIX}v{n}", "netns", ns)
            sh("ip", "link", "set", f"{PREFIX}p{n}", "netns", switch)
            sh("ip", "-n", switch, "link", "set", f"{PREFIX}p{n}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{NET}.{n}/24", "dev", f"{PREFIX}v{n}")
            sh("ip", "-n", ns, "link", "set", f"{PREFIX}v{n}", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        return self

    def down(self) -> None:
        for ns in reversed(self.made):  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def spawn(self, host: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], env=env, cwd=ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net.up()
    finally:
        net.down()


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 20) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(wait)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.root
def test_workers_on_two_hosts_share_a_job_and_survive_one_host_dying(network, tmp_path):
    procs: list[subprocess.Popen] = []
    site, shared = tmp_path / "site", tmp_path / "shared"
    site.mkdir()
    bodies = {f"f{i}.bin": os.urandom(60_000 + i) for i in range(40)}
    for name, body in bodies.items():
        (site / name).write_bytes(body)
    broker = f"redis://:netns-test-pw@{NET}.1:6379"
    env = base_env(CELERY_BROKER_URL=f"{broker}/0", CELERY_RESULT_BACKEND=f"{broker}/1", FLEETFETCH_DIR=str(shared),
                   FLEETFETCH_ALLOW_NETWORKS=f"{NET}.0/24", FLEETFETCH_PER_HOST="0",
                   **FAST_HEAL)
    try:
        procs.append(network.spawn("broker", [server_binary(), "--bind", f"{NET}.1", "--port", "6379", "--dir",
                                              str(tmp_path), "--appendonly", "yes", "--save", "", "--requirepass",
                                              "netns-test-pw"],
                                   env, tmp_path / "redis.log"))
        procs.append(network.spawn("origin", [sys.executable, "-m", "tests.support.slow_static", f"{NET}.2", "8080",
                                              str(site), "300000"], env, tmp_path / "origin.log"))
        # The test process is outside every namespace: it watches through logs and the shared files only.
        worker_argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-c", "2", "--loglevel=INFO",
                       "--without-gossip", "--without-mingle"]
        w1 = network.spawn("w1", [*worker_argv, "-n", "w1@host1"], env, tmp_path / "w1.log")
        procs.append(w1)
        wait_for(lambda: " ready." in (tmp_path / "w1.log").read_text(), 40, "worker-1")
        listing = write_list(tmp_path / "urls.txt", [f"http://{NET}.2:8080/{n}" for n in bodies])
        producer = network.spawn("prod", [sys.executable, "-m", "producer", str(listing), "-q"], env,
                                 tmp_path / "producer.log")
        procs.append(producer)
        wait_for(lambda: len(list(shared.glob("f*.bin"))) >= 4, 60, "first files")
        # A worker that starts late joins the job...
        w2 = network.spawn("w2", [*worker_argv, "-n", "w2@host2"], env, tmp_path / "w2.log")
        procs.append(w2)
        wait_for(lambda: "Finished " in (tmp_path / "w2.log").read_text(), 40, "worker-2 taking work")
        # ...and when host 1 dies with downloads in flight, host 2 finishes everything.
        stop_group(w1, signal.SIGKILL)
        assert producer.wait(150) == 0, (tmp_path / "producer.log").read_text()
        for name, body in bodies.items():
            assert hashlib.sha256((shared / name).read_bytes()).digest() == hashlib.sha256(body).digest(), name
        assert not list(shared.glob(".*.part"))
        results = network.spawn("prod", [sys.executable, "-m", "producer", "results",
                                         _last_job(env, network, tmp_path)], env, tmp_path / "results.jsonl")
        results.wait(60)
        records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
        assert len(records) == len(bodies) and {r["status"] for r in records} == {"done"}
        assert {r["worker"] for r in records} == {"w1@host1", "w2@host2"}
    finally:
        for proc in reversed(procs):
            stop_group(proc)


def _last_job(env: dict[str, str], network: Network, tmp_path: Path) -> str:
    """The newest job id, read through the producer's namespace (the test process cannot reach the broker)."""
    code = "import redis,os;r=redis.Redis.from_url(os.environ['CELERY_RESULT_BACKEND']);" \
           "print(r.zrange('ff:jobs',-1,-1)[0].decode())"
    out = tmp_path / "jobid.txt"
    network.spawn("prod", [sys.executable, "-c", code], env, out).wait(30)
    return out.read_text().strip().splitlines()[-1]
