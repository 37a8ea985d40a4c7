"""--proxy: every request goes through the given HTTP proxy (never one from the environment); the proxy's own
address must pass the destination policy, and so must each destination's name as the worker resolves it."""

from __future__ import annotations

import base64
import json

from bench.realparts.servers import RedisServer, Worker
from tasks.config import QUEUE
from tests.conftest import ROOT, Cluster, job_id_of, read_manifest, write_list
from tests.support.proxy import Proxy


def test_downloads_go_through_the_proxy_with_its_password_kept_secret(tmp_path, origin):
    server = RedisServer(tmp_path / "redis").start()
    try:
        c = Cluster(server, tmp_path / "dl")
        origin.add("/p1.txt", b"via proxy 1")
        origin.add("/p2.txt", b"via proxy 2")
        with Proxy("127.0.0.1").start() as proxy:
            listing = write_list(tmp_path / "urls.txt", [origin.url("/p1.txt"), origin.url("/p2.txt")])
            proxy_url = f"http://squid:pr0xy-pass@127.0.0.1:{proxy.port}"
            queued = c.producer(str(listing), "--no-wait", "--proxy", proxy_url)
            assert queued.returncode == 0, queued.stdout + queued.stderr
            raw = server.client(0).lrange(QUEUE, 0, -1)
            messages = b"".join(m + base64.b64decode(json.loads(m)["body"]) for m in raw)
            assert len(raw) == 2 and b"pr0xy-pass" not in messages
            w = Worker(c.env, name="px", concurrency=2, log=tmp_path / "w.log", cwd=ROOT).start()
            try:
                manifest = tmp_path / "m.jsonl"
                result = c.producer("resume", job_id_of(queued.stdout), "--manifest", str(manifest))
            finally:
                w.stop()
        assert result.returncode == 0, result.stdout + result.stderr
        assert (tmp_path / "dl" / "p1.txt").read_bytes() == b"via proxy 1"
        assert sorted(a.target for a in proxy.asked) == [origin.url("/p1.txt"), origin.url("/p2.txt")]
        expected = "Basic " + base64.b64encode(b"squid:pr0xy-pass").decode()
        assert all(a.headers["Proxy-Authorization"] == expected for a in proxy.asked)
        assert all(r.headers.get("Via") == "1.1 test-proxy" for r in origin.requests)  # nothing went around it
        shown = queued.stdout + queued.stderr + result.stdout + result.stderr + manifest.read_text() + w.log_text()
        assert "pr0xy-pass" not in shown
        assert [r["status"] for r in read_manifest(manifest)] == ["done", "done"]
    finally:
        server.stop()


def test_the_proxy_address_and_the_destinations_are_checked(cluster, worker, origin, tmp_path):
    origin.add("/ok.txt", b"ok")
    with Proxy("127.0.0.2").start() as internal, Proxy("127.0.0.1").start() as proxy:
        listing = write_list(tmp_path / "u1.txt", [origin.url("/ok.txt")])
        manifest = tmp_path / "m1.jsonl"
        result = cluster.producer(str(listing), "-d", "px1", "--proxy", internal.url, "--manifest", str(manifest))
        assert result.returncode == 1
        assert read_manifest(manifest)[0]["reason"].startswith("proxy 127.0.0.2: refused")
        assert internal.asked == [] and origin.requests == []  # a refused proxy is never contacted
        refused = f"http://refused.test:{origin.port}/ok.txt"  # resolves to 127.0.0.2 for the workers
        listing = write_list(tmp_path / "u2.txt", [refused, origin.url("/ok.txt")])
        manifest = tmp_path / "m2.jsonl"
        result = cluster.producer(str(listing), "-d", "px2", "--proxy", proxy.url, "--manifest", str(manifest))
        assert result.returncode == 1
        records = read_manifest(manifest)
        assert records[0]["status"] == "failed" and "refused" in records[0]["reason"]
        assert records[1]["status"] == "done"
        assert [a.target for a in proxy.asked] == [origin.url("/ok.txt")]  # the refused one was never asked for


def test_a_bad_proxy_is_one_error_line(cluster, tmp_path):
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x"])
    for bad, message in (("socks5://u:secretpw@127.0.0.1:1080", "only http:// proxies"),
                         ("http://127.0.0.1:99999", "not a valid URL"), ("http://127.0.0.1:3128/path", "nothing else")):
        result = cluster.producer(str(listing), "--proxy", bad)
        assert result.returncode == 2 and result.stderr.startswith("error: --proxy ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "secretpw" not in result.stderr
