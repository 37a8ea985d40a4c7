"""What a downloader user sets on the requests: headers, User-Agent, a rate limit; secrets stay hidden.

Every test goes through real workers and Redis to a loopback origin and asserts what the origin received.
"""

from __future__ import annotations

import base64
import hashlib
import json

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from tasks.config import QUEUE
from tasks.fetch import USER_AGENT
from tasks.version import VERSION
from tests.conftest import ROOT, Cluster, job_id_of, read_manifest, write_list

SECRETS = ("Bearer s3cr3t-bearer", "k3y-value-42", "url-t0ken-77")


def test_headers_and_user_agent_reach_the_origin(cluster, worker, origin, tmp_path):
    origin.add("/h.txt", b"headers")
    origin.add("/default-ua.txt", b"ua")
    listing = write_list(tmp_path / "urls.txt", [origin.url("/h.txt")])
    result = cluster.producer(str(listing), "-d", "hdr", "--header", "X-Trace: abc 123", "-H", "Accept: text/plain",
                              "--user-agent", "MyCrawler/2.0 (ops@example.org)")
    assert result.returncode == 0, result.stdout + result.stderr
    seen = origin.requests_for("/h.txt")[0].headers
    assert seen["X-Trace"] == "abc 123" and seen["Accept"] == "text/plain"
    assert seen["User-Agent"] == "MyCrawler/2.0 (ops@example.org)"
    result = cluster.producer(str(write_list(tmp_path / "u2.txt", [origin.url("/default-ua.txt")])), "-d", "hdr")
    assert result.returncode == 0, result.stdout + result.stderr
    ua = origin.requests_for("/default-ua.txt")[0].headers["User-Agent"]
    assert ua == USER_AGENT and ua.startswith(f"fleetfetch/{VERSION} ") and "github.com" not in ua


def test_a_bad_header_is_one_error_line(cluster, tmp_path):
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x"])
    for bad in ("NoColon", "Bad Name: v"):
        result = cluster.producer(str(listing), "-H", bad)
        assert result.returncode == 2 and result.stderr.startswith("error: --header")
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_secret_headers_never_travel_in_messages_nor_follow_a_redirect(tmp_path, origin):
    """Authorization, *-Key and *-Token values stay in the ledger: the broker's messages, the worker's log and
    the records never show them; the origin gets them; another host reached by a redirect does not."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        c = Cluster(server, tmp_path / "dl")
        with Origin("127.0.0.1").start() as other:
            other.add("/landing.txt", b"landed")
            origin.redirect("/hop", other.url("/landing.txt"))
            origin.add("/direct.txt", b"direct")
            listing = write_list(tmp_path / "urls.txt", [
                origin.url("/direct.txt"), "  header=X-Auth-Token: url-t0ken-77", origin.url("/hop")])
            queued = c.producer(str(listing), "--no-wait", "-H", "Authorization: Bearer s3cr3t-bearer",
                                "-H", "X-Api-Key: k3y-value-42", "-H", "X-Trace: visible-1")
            assert queued.returncode == 0, queued.stdout + queued.stderr
            job = job_id_of(queued.stdout)
            raw = server.client(0).lrange(QUEUE, 0, -1)
            messages = b"".join(m + base64.b64decode(json.loads(m)["body"]) for m in raw)
            assert messages.count(b"visible-1") == 2  # the plain header travels in each message...
            assert not any(s.encode() in messages for s in SECRETS)  # ...the secret ones do not
            w = Worker(c.env, name="sec", concurrency=2, log=tmp_path / "w.log", cwd=ROOT).start()
            try:
                manifest = tmp_path / "m.jsonl"
                result = c.producer("resume", job, "--manifest", str(manifest))
            finally:
                w.stop()
            assert result.returncode == 0, result.stdout + result.stderr
            direct = origin.requests_for("/direct.txt")[0].headers
            assert direct["Authorization"] == "Bearer s3cr3t-bearer" and direct["X-Api-Key"] == "k3y-value-42"
            assert direct["X-Auth-Token"] == "url-t0ken-77" and direct["X-Trace"] == "visible-1"
            hop = origin.requests_for("/hop")[0].headers
            assert hop["Authorization"] == "Bearer s3cr3t-bearer" and "X-Auth-Token" not in hop
            landed = other.requests_for("/landing.txt")[0].headers
            assert landed["X-Trace"] == "visible-1"
            assert not any(h in landed for h in ("Authorization", "X-Api-Key", "X-Auth-Token"))
            shown = queued.stdout + queued.stderr + result.stdout + result.stderr + manifest.read_text() + \
                w.log_text()
            assert not any(s in shown for s in SECRETS)
            assert [r["status"] for r in read_manifest(manifest)] == ["done", "done"]
    finally:
        server.stop()


def test_limit_rate_holds_each_download_within_20_percent(cluster, worker, origin, tmp_path):
    body = bytes(range(256)) * 4096  # 1 MiB
    origin.add("/slow1.bin", body)
    origin.add("/slow2.bin", body)
    manifest = tmp_path / "m.jsonl"
    listing = write_list(tmp_path / "urls.txt", [origin.url("/slow1.bin"), origin.url("/slow2.bin")])
    result = cluster.producer(str(listing), "-d", "rate", "--limit-rate", "256K", "--manifest", str(manifest))
    assert result.returncode == 0, result.stdout + result.stderr
    expected = len(body) / (256 * 1024)  # 4 s each: the limit is per download, both run at once
    for record in read_manifest(manifest):
        assert 0.8 * expected <= record["elapsed_s"] <= 1.2 * expected, record
        assert record["sha256"] == hashlib.sha256(body).hexdigest()


def test_version_and_help_document_the_options(cluster):
    version = cluster.producer("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"fleetfetch {VERSION}"
    helptext = cluster.producer("--help").stdout
    for option in ("--header", "--user-agent", "--limit-rate", "--force-directories", "--queue", "--netrc-file",
                   "--load-cookies", "--proxy", "--version", "jobs", "cancel"):
        assert option in helptext, option
    assert "--json" in cluster.producer("status", "--help").stdout


OWNED = ["Range: bytes=0-9", "If-None-Match: *", "Content-Length: 5", "Transfer-Encoding: chunked", "Host: other",
         "Connection: close", "Expect: 100-continue", "TE: trailers", "Upgrade: h2c", "if-modified-since: x"]


def test_headers_that_change_framing_or_meaning_are_refused_at_validation(cluster, tmp_path):
    before = cluster.broker().llen(QUEUE)
    lines = ["http://127.0.0.1/f.pdf", *(f"  header={h}" for h in OWNED), "  header=X-Name: \u540d\u524d"]
    listing = write_list(tmp_path / "list.aria2", lines)
    result = cluster.producer(str(listing))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert [e.split(": ", 2)[1] for e in errors[:-1]] == [f"{listing}:{n}" for n in range(2, len(lines) + 1)]
    assert all("is fleetfetch's own" in e for e in errors[:len(OWNED)]) and "not Latin-1" in errors[len(OWNED)]
    for header in ("Range: bytes=0-9", "If-None-Match: *"):
        given = cluster.producer(str(write_list(tmp_path / "u.txt", ["http://127.0.0.1/g"])), "-H", header)
        assert given.returncode == 2 and given.stderr.startswith("error: --header")
        assert "fleetfetch's own" in given.stderr and len(given.stderr.strip().splitlines()) == 1
    assert cluster.broker().llen(QUEUE) == before


def test_long_lines_and_headers_are_refused_at_validation(cluster, tmp_path):
    before = cluster.broker().llen(QUEUE)
    lines = ["http://127.0.0.1/f.pdf", "  header=X-Big: " + "a" * (9 << 10), "  header=X-Huge: " + "b" * (1 << 20),
             "http://127.0.0.1/" + "c" * (70 << 10)]
    listing = write_list(tmp_path / "long.txt", lines)
    result = cluster.producer(str(listing))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert [e.split(": ", 2)[1] for e in errors[:-1]] == [f"{listing}:{n}" for n in (2, 3, 4)]
    assert "longer than 8192 bytes" in errors[0] and "line longer than 65536" in errors[1] + errors[2]
    assert max(len(e) for e in errors) < 300
    big = cluster.producer(str(write_list(tmp_path / "u.txt", ["http://127.0.0.1/g"])), "-H", "X-Big: " + "a" * 9000)
    assert big.returncode == 2 and "longer than 8192 bytes" in big.stderr
    assert cluster.broker().llen(QUEUE) == before
