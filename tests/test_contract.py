"""The contract between producer and worker: the task message, its options, and what the CLI sends."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from tasks.config import QUEUE, Settings
from tasks.errors import BadMessage
from tasks.message import Entry, Message, Options, RetryState
from tests.conftest import ROOT, Cluster, write_list

SECRET = "pw-Zq7!x"


# pure ------------------------------------------------------------------------------------------------
@pytest.mark.fast
def test_message_round_trip_carries_only_what_was_set():
    msg = Message.of("job1", Entry(3, "http://h.test/a.pdf", "a.pdf", "ab" * 32), Options(per_host=8, force=True))
    args, kwargs = msg.encode()
    assert args == ("http://h.test/a.pdf", "a.pdf")
    assert kwargs == {"job": "job1", "index": 3, "opts": {"sha256": "ab" * 32, "force": True, "per_host": 8}}
    assert json.loads(json.dumps(kwargs)) == kwargs  # JSON only
    back = Message.decode(*args, **kwargs)
    assert back == msg


def test_options_typed_by_the_user_win_over_the_workers_settings():
    worker = Settings.from_env({"FLEETFETCH_PER_HOST": "2", "FLEETFETCH_MAX_SIZE": "100"})
    resolved = Options(per_host=8).resolve(worker)
    assert resolved.per_host == 8  # typed by the user: kept, even where it equals a default
    assert resolved.max_size == 100 and resolved.max_attempts == worker.max_attempts  # unset: the worker's


@pytest.mark.parametrize("opts,reason", [
    ({"per_hots": 3}, r"unknown option\(s\) per_hots"),
    ({"max_size": "big"}, "bad value for max_size"),
    ({"force": 1}, "bad value for force"),
    ({"attempt": True}, "bad value for attempt"),
    ({"headers": "X-A: 1"}, "bad value for headers"),
    ({"headers": [["X-A"]]}, "bad value for headers: pairs of strings"),
    ({"limit_rate": 1.5}, "bad value for limit_rate"),
    ({"headers": [["Range", "bytes=0-9"]]}, "a header fleetfetch owns"),
    ({"resume": {"etag": 5}}, "bad value for resume"),
])
@pytest.mark.fast
def test_a_message_off_the_contract_fails_loudly(opts, reason):
    with pytest.raises(BadMessage, match=reason):
        Message.decode("http://h.test/a", "a", "job", 0, opts)


def test_a_urls_own_options_and_headers_travel_but_never_secret_ones():
    own = {"subdir": "reports", "user_agent": "Wget/1.21", "headers": [["X-Api-Key", "k"], ["Accept", "text/csv"]]}
    job = Options(subdir="job", headers=(("X-Trace", "t"),), limit_rate=512000)
    msg = Message.of("job1", Entry(0, "http://h.test/a.pdf", "a.pdf", None, own), job)
    args, kwargs = msg.encode()
    assert json.loads(json.dumps(kwargs["opts"])) == {  # the URL's dir= inside the job's, its headers after
        "subdir": "job/reports", "headers": [["X-Trace", "t"], ["Accept", "text/csv"]], "user_agent": "Wget/1.21",
        "limit_rate": 512000, "secret_headers": True}  # X-Api-Key stays in the ledger
    assert '"k"' not in json.dumps(kwargs)
    assert Message.decode(*args, **json.loads(json.dumps(kwargs))).options == msg.options


@pytest.mark.fast
def test_a_url_with_secrets_travels_sealed():
    url = f"http://user:{SECRET}@h.test/f?token=abc&page=2"
    msg = Message.of("job1", Entry(0, url, "f", None), Options(), RetryState(attempt=2))
    args, kwargs = msg.encode()
    assert SECRET not in json.dumps([args, kwargs]) and "abc" not in args[0]
    assert kwargs["opts"] == {"attempt": 2, "sealed": True}
    assert SECRET not in "".join(msg.display())


# end to end ------------------------------------------------------------------------------------------
@pytest.fixture
def own(tmp_path: Path) -> Iterator[Cluster]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield Cluster(server, tmp_path / "downloads")
    finally:
        server.stop()


def test_per_host_typed_by_the_user_reaches_workers_with_another_default(own, tmp_path):
    """`--per-host 50` equals the producer's default, but the workers run FLEETFETCH_PER_HOST=1: 50 must win."""
    with Origin("127.0.0.1").start() as origin, \
            Worker(dict(own.env, FLEETFETCH_PER_HOST="1"), name="strict", concurrency=4, log=tmp_path / "w.log",
                   cwd=ROOT) as _:
        for i in range(8):
            origin.add(f"/s{i}", b"x" * 30_000, delay=0.4)
        result = own.producer(str(write_list(tmp_path / "urls.txt", [origin.url(f"/s{i}") for i in range(8)])),
                              "--per-host", str(Settings().per_host))
        assert result.returncode == 0, result.stdout + result.stderr
        assert origin.max_concurrent >= 2  # with the worker's 1, downloads would have run one at a time


def _bodies(broker) -> str:
    """Every task message in the broker (queue and unacknowledged), decoded."""
    raw = broker.lrange(QUEUE, 0, -1) + broker.hvals("unacked")
    out = []
    for item in raw:
        envelope = json.loads(item)
        envelope = envelope[0] if isinstance(envelope, list) else envelope
        out.append(json.dumps(envelope) + base64.b64decode(envelope["body"]).decode())
    return "\n".join(out)


def test_secrets_never_reach_the_broker_inspect_or_results(own, tmp_path):
    """Tasks waiting for a host slot sit in `inspect scheduled`; none of it (nor the queue, nor `results` of the
    running job) shows the password, and the downloads still authenticate with it."""
    with Origin("127.0.0.1").start() as origin, \
            Worker(own.env, name="w", concurrency=2, log=tmp_path / "w.log", cwd=ROOT) as worker:
        for i in range(4):
            origin.add(f"/p{i}", b"y" * 60_000, rate=30_000)
        base = origin.url("/").replace("http://", f"http://user:{SECRET}@").rstrip("/")
        listing = write_list(tmp_path / "urls.txt", [f"{base}/p{i}?token=t0k3n" for i in range(4)])
        proc = own.producer_async(str(listing), "--per-host", "1", "-q")
        try:
            deadline = time.monotonic() + 20
            while not origin.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            shown = _bodies(own.broker())
            for what in ("scheduled", "reserved", "active"):
                shown += subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "inspect", what, "-t", "5"],
                                        env=own.env, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
            jobs = own.backend().zrange("ff:jobs", 0, -1)
            shown += own.producer("results", jobs[-1].decode()).stdout
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, out + err
        assert "scheduled" in shown or "eta" in shown  # inspect answered
        assert SECRET not in shown and "t0k3n" not in shown
        assert SECRET not in worker.log_text() and "t0k3n" not in worker.log_text()
        assert SECRET not in out + err
        assert all(r.headers.get("Authorization", "").startswith("Basic ") for r in origin.requests)
        assert len({r.path for r in origin.requests}) == 4


def test_cluster_dir_is_checked_as_the_workers_check_names(cluster, tmp_path):
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x"])
    result = cluster.producer(str(listing), "-d", "ok/.cache")
    assert result.returncode == 2, result.stderr
    assert "'.cache' is not a name the workers accept" in result.stderr and "Traceback" not in result.stderr


def test_every_bad_line_is_reported_and_nothing_is_enqueued(cluster, tmp_path):
    lines = ["http://127.0.0.1/ok"] + [f"ftp://127.0.0.1/{i}" for i in range(25)]
    before = cluster.broker().llen(QUEUE)
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)))
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in errors)
    assert [e.split(":")[2] for e in errors[:20]] == [str(n) for n in range(2, 22)]
    assert "and 5 more" in errors[20] and "nothing was enqueued" in errors[21]
    assert cluster.broker().llen(QUEUE) == before


def test_a_pool_local_mode_cannot_run_is_a_usage_error(tmp_path):
    from tests.conftest import base_env

    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:1/x"])
    for env, args in ((base_env(FLEETFETCH_POOL="gevent"), []), (base_env(), ["--pool", "gevent"])):
        result = subprocess.run([sys.executable, "-m", "producer", str(listing), "-d", str(tmp_path / "d"), *args],
                                env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and "gevent" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # exited meanwhile
        return ""


def test_a_local_worker_that_dies_is_one_line_and_exit_4(tmp_path):
    from tests.conftest import base_env

    with Origin("127.0.0.1").start() as origin:
        origin.add("/slow", b"z" * 200_000, rate=20_000)
        listing = write_list(tmp_path / "urls.txt", [origin.url("/slow")])
        proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "-d", str(tmp_path / "d")],
                                env=base_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not origin.requests and time.monotonic() < deadline:
                time.sleep(0.05)
            workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "tasks.worker" in _cmdline(p)]
            assert workers, "no local worker found"
            for p in workers:
                p.kill()
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 4, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the local worker exited")


def test_the_contract_and_the_pure_policies_import_without_celery_or_requests():
    code = ("import sys, tasks.message, tasks.errors, tasks.retry, tasks.naming, tasks.guard, tasks.redact; "
            "print(sorted(m for m in ('celery', 'requests', 'kombu', 'urllib3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
