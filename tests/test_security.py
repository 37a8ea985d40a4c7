"""Enforcement in the worker: refused destinations get zero requests, secrets stay hidden, paths stay inside.

All traffic is loopback: workers may reach 127.0.0.1 only (FLEETFETCH_ALLOW_NETWORKS=127.0.0.1/32), and an
origin on 127.0.0.2 stands for an internal service that must never be contacted.
"""

from __future__ import annotations

import subprocess
import sys
import time

from kombu import Connection

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from tasks.config import QUEUE, TASK_NAME
from tests.conftest import ROOT, Cluster, read_manifest, write_list

REFUSAL = "refused: 127.0.0.2 is not a public address (set FLEETFETCH_ALLOW_NETWORKS to allow)"


def test_refused_destinations_are_never_contacted(cluster, worker, origin, tmp_path):
    with Origin("127.0.0.2").start() as internal:
        internal.add("/secret", b"internal data")
        port = internal.base_url.rsplit(":", 1)[1]
        origin.redirect("/to-internal", internal.url("/secret"))
        lines = [internal.url("/secret"),                       # directly
                 origin.url("/to-internal"),                    # via a redirect from an allowed host
                 f"http://refused.test:{port}/secret",          # via a host name resolving to it
                 f"http://2130706434:{port}/secret",            # decimal form of 127.0.0.2
                 f"http://0x7f000002:{port}/secret",            # hex form
                 f"http://127.2:{port}/secret"]                 # short form
        manifest = tmp_path / "m.jsonl"
        result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "-d", "ssrf",
                                  "--manifest", str(manifest))
        assert result.returncode == 1
        records = read_manifest(manifest)
        assert [r["status"] for r in records] == ["failed"] * len(lines)
        assert all(r["reason"] == REFUSAL for r in records), records
        assert all(r["attempts"] == 1 for r in records)
        assert internal.requests == []
        assert len(origin.requests_for("/to-internal")) == 1


def test_credentials_are_not_sent_to_another_host_on_redirect(cluster, worker, origin, tmp_path):
    with Origin("127.0.0.1").start() as other:
        other.add("/landing.txt", b"landed")
        origin.redirect("/hop", other.url("/landing.txt"))
        host = origin.base_url.removeprefix("http://")
        url = f"http://alice:hunter2@{host}/hop"
        result = cluster.producer(str(write_list(tmp_path / "urls.txt", [url])), "-d", "creds")
        assert result.returncode == 0, result.stdout + result.stderr
        assert origin.requests_for("/hop")[0].headers["Authorization"].startswith("Basic ")
        assert "Authorization" not in other.requests_for("/landing.txt")[0].headers
        assert "hunter2" not in result.stdout + result.stderr


def test_secrets_in_urls_are_redacted_everywhere(cluster, worker, origin, tmp_path):
    host = origin.base_url.removeprefix("http://")
    secret_urls = [f"http://bob:pa55word@{host}/missing.pdf?X-Amz-Signature=sig0123secret&page=1",
                   f"{origin.url('/gone.bin')}?token=tok0123secret"]
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", secret_urls)), "-d", "redact",
                              "--manifest", str(manifest))
    assert result.returncode == 1
    time.sleep(0.5)
    shown = result.stdout + result.stderr + manifest.read_text() + worker.log_text()
    for secret in ("pa55word", "sig0123secret", "tok0123secret"):
        assert secret not in shown
    # The summary groups the two 404s in one line naming the first URL; the manifest has each.
    assert "X-Amz-Signature=****" in result.stdout and "page=1" in result.stdout
    assert "token=****" in manifest.read_text()
    # ...while the real URL still travelled in the task: the origin saw the query string.
    assert origin.requests_for("/gone.bin")[0].path.endswith("token=tok0123secret")


def test_symlinks_in_the_download_dir_are_not_written_through(cluster, worker, origin, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_bytes(b"do not touch")
    sub = cluster.downloads / "links"
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "planted.txt").symlink_to(victim)
    (sub / ".planted2.txt.part").symlink_to(outside / "victim2.txt")
    (cluster.downloads / "escape").symlink_to(outside, target_is_directory=True)
    origin.add("/planted.txt", b"downloaded")
    origin.add("/planted2.txt", b"downloaded 2")
    listing = write_list(tmp_path / "urls.txt", [origin.url("/planted.txt"), origin.url("/planted2.txt")])
    result = cluster.producer(str(listing), "-d", "links", "--manifest", str(tmp_path / "m.jsonl"))
    assert victim.read_bytes() == b"do not touch"
    assert not (outside / "victim2.txt").exists()
    assert (sub / "planted.txt").read_bytes() == b"downloaded" and not (sub / "planted.txt").is_symlink()
    records = read_manifest(tmp_path / "m.jsonl")
    assert records[1]["status"] == "failed" and "symlink" in records[1]["reason"]
    assert result.returncode == 1
    escaped = cluster.producer(str(write_list(tmp_path / "u2.txt", [origin.url("/planted.txt")])), "-d", "escape",
                               "--manifest", str(tmp_path / "m2.jsonl"))
    assert escaped.returncode == 1 and "leads outside the download directory" in escaped.stdout
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_worker_rejects_pickle_messages_without_running_them(cluster, worker, origin, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    origin.add("/p.txt", b"p")
    with Connection(cluster.env["CELERY_BROKER_URL"]) as conn:
        producer = conn.Producer(serializer="pickle")
        producer.publish([[origin.url("/p.txt"), "p.txt"], {"opts": {"evil": Evil()}}, {}],
                         routing_key=QUEUE, serializer="pickle",
                         headers={"task": TASK_NAME, "id": "pickle-test", "lang": "py", "argsrepr": "",
                                  "kwargsrepr": ""})
    deadline = time.monotonic() + 15
    while "pickle" not in worker.log_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "untrusted content of type pickle" in worker.log_text()
    assert not marker.exists()
    assert origin.requests_for("/p.txt") == []


def test_password_protected_redis(tmp_path, origin):
    server = RedisServer(tmp_path / "redis", password="s3cret-redis-pw").start()
    try:
        c = Cluster(server, tmp_path / "dl")
        w = Worker(c.env, name="pw", concurrency=1, log=tmp_path / "w.log", cwd=ROOT).start()
        try:
            origin.add("/x.txt", b"x")
            result = c.producer(str(write_list(tmp_path / "urls.txt", [origin.url("/x.txt")])))
            assert result.returncode == 0, result.stdout + result.stderr
            assert (tmp_path / "dl" / "x.txt").read_bytes() == b"x"
            assert "s3cret-redis-pw" not in w.log_text()
        finally:
            w.stop()
        wrong = dict(c.env, CELERY_BROKER_URL=server.url(0).replace("s3cret-redis-pw", "wrong-pw"))
        denied = subprocess.run([sys.executable, "-m", "producer", str(tmp_path / "urls.txt")], env=wrong,
                                capture_output=True, text=True, timeout=60)
        assert denied.returncode == 3 and "refused the password" in denied.stderr
        assert "wrong-pw" not in denied.stderr
    finally:
        server.stop()


def test_environment_proxy_is_ignored():
    """An HTTP(S)_PROXY in the worker's environment would connect for us and bypass the destination check."""
    from tasks.fetch import session

    s, _ = session()
    assert s.trust_env is False


def test_a_netrc_login_is_not_sent_to_another_port_after_a_redirect(cluster, worker, origin, tmp_path):
    with Origin("127.0.0.1").start() as other_port:
        other_port.add("/landing.txt", b"landed")
        origin.redirect("/hop", other_port.url("/landing.txt"))
        origin.add("/direct.txt", b"direct")
        (tmp_path / "netrc").write_text("machine 127.0.0.1 login alice password nt-hunter2\n")
        listing = write_list(tmp_path / "urls.txt", [origin.url("/hop"), origin.url("/direct.txt")])
        result = cluster.producer(str(listing), "-d", "netrc-port", "--netrc-file", str(tmp_path / "netrc"))
        assert result.returncode == 0, result.stdout + result.stderr
        assert origin.requests_for("/hop")[0].headers["Authorization"].startswith("Basic ")
        assert origin.requests_for("/direct.txt")[0].headers["Authorization"].startswith("Basic ")
        assert "Authorization" not in other_port.requests_for("/landing.txt")[0].headers


def test_a_redirect_to_a_jwt_signed_url_is_masked_in_the_record(cluster, worker, origin, tmp_path):
    origin.add("/asset.bin", b"asset")
    origin.redirect("/release", origin.url("/asset.bin") + "?sp=r&jwt=eyJhbGciOi.jwt-s3cret;sig=sig-s3cret")
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "u.txt", [origin.url("/release")])), "-d", "jwt",
                              "--manifest", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    record = read_manifest(manifest)[0]
    assert record["final_url"].endswith("/asset.bin?sp=r&jwt=****;sig=****")
    assert "s3cret" not in manifest.read_text() + worker.log_text()
