"""Hostile lists, hostile servers and a shared download volume, end to end.

Each test is one hole an attacker review found (file substitution, secrets in tracebacks, writes outside the
download directory, an open embedded server, a dripping server, bad settings, hostile headers) and fails
without its fix. Real Redis, real `celery worker` processes, a real HTTP origin; all traffic on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.realparts.servers import RedisServer, Worker
from tasks import labels
from tasks.naming import with_hash
from tests.conftest import ROOT, Cluster, base_env, job_id_of, read_manifest, write_list

# Every URL-legal character a password may hold unencoded (RFC 3986 userinfo), plus a pct-encoded one.
PASSWORD = "pW-._~!$&'()*+,;=:%41rd9"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Worker]]:
    """A cluster of its own (Redis, worker, download directory) whose download directory tests may booby-trap."""
    base = tmp_path_factory.mktemp("hostile")
    server = RedisServer(base / "redis").start()
    try:
        cluster = Cluster(server, base / "downloads")
        worker = Worker(cluster.env, name="hostile", concurrency=4, log=base / "worker.log", cwd=ROOT).start()
        try:
            yield cluster, worker
        finally:
            worker.stop()
    finally:
        server.stop()


def run(cluster: Cluster, tmp_path: Path, lines: list[str], *args: str) -> tuple[subprocess.CompletedProcess, list]:
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "--manifest", str(manifest), *args)
    assert "Traceback" not in result.stderr, result.stderr
    return result, read_manifest(manifest) if manifest.exists() else []


def assert_every_done_record_matches_its_file(cluster: Cluster, records: list[dict]) -> None:
    """The guarantee: two URLs never end at one path, and a `done` record's SHA-256 is its file's."""
    done = [r for r in records if r["status"] in ("done", "unchanged")]
    paths = [r["path"] for r in done]
    assert len(set(paths)) == len(paths), paths
    for r in done:
        assert hashlib.sha256((cluster.downloads / r["path"]).read_bytes()).hexdigest() == r["sha256"], r


# --- file substitution -------------------------------------------------------------------------------------


def test_a_list_holding_another_urls_hashed_name_still_gives_every_url_its_own_file(hostile, origin, tmp_path):
    cluster, _ = hostile
    b = origin.url("/B/f.pdf")
    crafted = with_hash("f.pdf", b)  # the name B would get for clashing with A/f.pdf
    bodies = {"/A/f.pdf": b"A's file", f"/A/{crafted}": b"the crafted one", "/B/f.pdf": b"B's file"}
    for path, body in bodies.items():
        origin.add(path, body)
    result, records = run(cluster, tmp_path, [origin.url(p) for p in bodies], "-d", "crafted")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["status"] for r in records] == ["done"] * 3
    assert_every_done_record_matches_its_file(cluster, records)
    assert sorted((cluster.downloads / r["path"]).read_bytes() for r in records) == sorted(bodies.values())


def test_content_disposition_never_puts_two_urls_in_one_file(hostile, origin, tmp_path):
    """A server naming its file after another URL's name, two responses naming one file, and a charset
    whose codec cannot replace bad bytes: every URL keeps its own file."""
    cluster, _ = hostile
    origin.add("/cd/a.bin", b"a: server says b.bin", content_disposition='attachment; filename="b.bin"')
    origin.add("/plain/b.bin", b"b: my own name", delay=1.0)  # commits after a.bin has taken "b.bin"
    origin.add("/cd/c.bin", b"c: also says b.bin", content_disposition='attachment; filename="b.bin"', delay=0.5)
    origin.add("/cd/d.bin", b"d: idna charset", content_disposition="attachment; filename*=idna''%C3%A9.txt")
    lines = [origin.url(p) for p in ("/cd/a.bin", "/plain/b.bin", "/cd/c.bin", "/cd/d.bin")]
    result, records = run(cluster, tmp_path, lines, "-d", "cd", "--content-disposition")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["status"] for r in records] == ["done"] * 4
    assert_every_done_record_matches_its_file(cluster, records)
    assert records[3]["path"] == "cd/é.txt"
    again, records = run(cluster, tmp_path, lines, "-d", "cd", "--content-disposition")  # a re-run keeps them
    assert again.returncode == 0 and len({r["path"] for r in records}) == 4
    assert_every_done_record_matches_its_file(cluster, records)


def test_a_name_cut_at_the_byte_limit_is_accepted_by_the_worker(hostile, origin, tmp_path):
    cluster, _ = hostile
    path = "/" + "a" * 179 + "%20b"
    origin.add(path, b"long name")
    result, records = run(cluster, tmp_path, [origin.url(path)], "-d", "long")
    assert result.returncode == 0, result.stdout + records.__repr__()
    assert records[0]["path"] == "long/" + "a" * 179


# --- secrets -----------------------------------------------------------------------------------------------


def test_a_password_with_any_punctuation_is_never_shown(hostile, origin, tmp_path):
    """A redirect loop's reason quotes the URL with its userinfo; the failure's traceback chained the
    original exception. Neither shows the password: summary, manifest, `results`, worker log, result backend."""
    cluster, worker = hostile
    origin.redirect("/loop", "/loop")
    host = origin.base_url.removeprefix("http://")
    url = f"http://user:{PASSWORD}@{host}/loop"
    result, records = run(cluster, tmp_path, [url], "-d", "secret")
    assert result.returncode == 1
    assert records[0]["reason"] == f"redirect loop at http://****@{host}/loop"
    shown = cluster.producer("results", job_id_of(result.stdout))
    time.sleep(0.5)  # the worker's last log lines
    backend = b"".join(cluster.backend().get(k) or b"" for k in cluster.backend().keys("celery-task-meta-*"))
    for text in (result.stdout, result.stderr, json.dumps(records), shown.stdout, worker.log_text(),
                 backend.decode(errors="replace")):
        assert PASSWORD not in text and PASSWORD[:8] not in text
    # The failure was logged as an expected one: one line, no traceback (neither the task's nor a chained one).
    log = worker.log_text()
    assert f"Failed http://****@{host}/loop: redirect loop" in log
    assert "Traceback" not in log and "raised unexpected" not in log


def test_file_labels_keep_no_secret(hostile, origin, tmp_path):
    """The validators travel on the file (an extended attribute other users may read): a digest of the URL."""
    cluster, _ = hostile
    origin.add("/signed.bin", b"signed", etag='"s1"')
    host = origin.base_url.removeprefix("http://")
    url = f"http://user:{PASSWORD}@{host}/signed.bin?X-Amz-Signature=sig0123secret"
    result, _ = run(cluster, tmp_path, [url], "-d", "signed")
    assert result.returncode == 0, result.stdout
    again, records = run(cluster, tmp_path, [url], "-d", "signed")
    assert records[0]["status"] == "unchanged"  # the digest still recognises the URL
    label = os.getxattr(cluster.downloads / records[0]["path"], labels.XATTR).decode()
    assert '"url":"sha256:' in label and "sig0123secret" not in label and "pW-" not in label


# --- writes outside the download directory -----------------------------------------------------------------


def test_a_planted_metadata_link_is_refused_before_anything_is_written(hostile, origin, tmp_path):
    cluster, _ = hostile
    outside = tmp_path / "outside"
    outside.mkdir()
    meta = cluster.downloads / ".fleetfetch" / "meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.symlink_to(outside, target_is_directory=True)
    origin.add("/m.txt", b"m", etag='"m1"')
    result, records = run(cluster, tmp_path, [origin.url("/m.txt")], "-d", "meta")
    assert result.returncode == 1
    assert records[0]["reason"] == "refused: '.fleetfetch/meta' leads outside the download directory (symlink?)"
    assert list(outside.iterdir()) == []
    assert origin.requests_for("/m.txt") == []


def test_a_planted_hard_link_as_temp_file_is_never_written_into(hostile, origin, tmp_path):
    cluster, _ = hostile
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    sub = cluster.downloads / "hardlink"
    sub.mkdir(parents=True)
    os.link(victim, sub / ".h.bin.part")
    origin.add("/h.bin", b"downloaded over the victim?")
    result, records = run(cluster, tmp_path, [origin.url("/h.bin")], "-d", "hardlink")
    assert result.returncode == 0, records
    assert victim.read_bytes() == b"do not touch"
    assert (sub / "h.bin").read_bytes() == b"downloaded over the victim?"
    assert_every_done_record_matches_its_file(cluster, records)


def test_a_new_sub_directory_is_never_created_through_a_linked_parent(hostile, origin, tmp_path):
    cluster, _ = hostile
    outside = tmp_path / "outside"
    outside.mkdir()
    (cluster.downloads / "linked").symlink_to(outside, target_is_directory=True)
    origin.add("/n.txt", b"n")
    result, records = run(cluster, tmp_path, [origin.url("/n.txt")], "-d", "linked/new")
    assert result.returncode == 1
    assert records[0]["reason"] == "refused: 'linked/new' leads outside the download directory (symlink?)"
    assert list(outside.iterdir()) == []


def test_the_manifest_is_never_written_through_a_planted_temp_link(hostile, origin, tmp_path):
    cluster, _ = hostile
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    (tmp_path / "m.jsonl.tmp").symlink_to(victim)
    origin.add("/man.txt", b"m")
    result, records = run(cluster, tmp_path, [origin.url("/man.txt")], "-d", "manifest")
    assert result.returncode == 0 and records[0]["status"] == "done"
    assert victim.read_bytes() == b"do not touch"


# --- unchanged files are trusted by their recorded size, inode and mtime -----------------------------------


def test_rerun_trusts_untouched_files_and_redownloads_edited_ones(hostile, origin, tmp_path):
    cluster, _ = hostile
    origin.add("/v.bin", b"version 1", etag='"v1"')
    lines = [origin.url("/v.bin")]
    first, _ = run(cluster, tmp_path, lines, "-d", "trust")
    assert first.returncode == 0
    target = cluster.downloads / "trust" / "v.bin"
    # Same size, inode and mtime, other bytes: only a worker that reads the file could notice. It does not:
    # the conditional request goes out and the 304 keeps the file (proof that nothing was re-read).
    st = target.stat()
    with open(target, "r+b") as fh:
        fh.write(b"VERSION 1")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, records = run(cluster, tmp_path, lines, "-d", "trust")
    assert records[0]["status"] == "unchanged"
    assert origin.requests_for("/v.bin")[-1].headers["If-None-Match"] == '"v1"'
    # An edit that keeps the size but changes the mtime: hashed again, found different, downloaded again.
    target.write_bytes(b"version X")
    _, records = run(cluster, tmp_path, lines, "-d", "trust")
    assert records[0]["status"] == "done" and target.read_bytes() == b"version 1"
    assert "If-None-Match" not in origin.requests_for("/v.bin")[-1].headers


# --- hostile headers ---------------------------------------------------------------------------------------


def test_hostile_headers_end_as_plain_records_not_internal_errors(hostile, origin, tmp_path):
    cluster, _ = hostile
    origin.add("/sup.bin", b"superscript length", no_length=True, headers={"Content-Length": "\u00b2"})
    origin.add("/ra.bin", b"after a 503")
    origin.fail("/ra.bin", [(503, {"Retry-After": "\u00b2"})])
    origin.redirect("/to-ftp", "ftp://127.0.0.1/file")
    origin.redirect("/to-broken", "http://[zz/x")
    lines = [origin.url(p) for p in ("/sup.bin", "/ra.bin", "/to-ftp", "/to-broken")]
    result, records = run(cluster, tmp_path, lines, "-d", "headers")
    assert [r["status"] for r in records] == ["done", "done", "failed", "failed"], records
    assert records[1]["attempts"] == 2
    assert records[2]["reason"] == "refused: scheme 'ftp' is not http or https"
    assert records[3]["reason"].startswith("invalid ") and records[3]["attempts"] == 1
    assert "internal error" not in result.stdout


# --- limits and settings -----------------------------------------------------------------------------------


def test_a_dripping_server_cannot_hold_a_thread_past_the_time_limit(origin, tmp_path):
    """The threads pool has no Celery time limit: the deadline is enforced on every socket read."""
    origin.add("/drip.bin", b"d" * 300_000, rate=1024)  # a kilobyte a second: never idle for a read timeout
    with RedisServer(tmp_path / "redis") as server:
        cluster = Cluster(server, tmp_path / "dl")
        cluster.env.update(FLEETFETCH_TIME_LIMIT="5")  # the limit under test; everything else as shipped
        with Worker(cluster.env, name="drip", pool="threads", concurrency=2, log=tmp_path / "w.log", cwd=ROOT):
            result, records = run(cluster, tmp_path, [origin.url("/drip.bin")])
    assert result.returncode == 1
    assert records[0]["reason"] == "time limit exceeded (FLEETFETCH_TIME_LIMIT)"
    assert not (tmp_path / "dl" / "drip.bin").exists()


@pytest.mark.parametrize("variable, value, message", [
    ("FLEETFETCH_ALLOW_NETWORKS", "127.0.0.1/33", "error: FLEETFETCH_ALLOW_NETWORKS: '127.0.0.1/33' is not a network"),
    ("FLEETFETCH_RESOLVE", "files.test:https:127.0.0.1", "error: FLEETFETCH_RESOLVE: 'files.test:https:127.0.0.1'"),
    ("FLEETFETCH_MAX_ATTEMPTS", "0", "error: FLEETFETCH_MAX_ATTEMPTS=0 must be at least 1"),
    ("FLEETFETCH_NO_FSYNC", "maybe", "error: FLEETFETCH_NO_FSYNC='maybe' is not a yes/no value"),
    ("FLEETFETCH_CA_BUNDLE", "/nonexistent/ca.pem", "error: FLEETFETCH_CA_BUNDLE='/nonexistent/ca.pem' cannot be read"),
])
def test_bad_settings_stop_producer_and_worker_at_start_with_one_line(cluster, origin, tmp_path, variable, value,
                                                                      message):
    env = dict(cluster.env, **{variable: value})
    listing = write_list(tmp_path / "urls.txt", [origin.url("/x.txt")])
    producer = cluster.producer(str(listing), env=env, timeout=60)
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-c", "1"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    for proc in (producer, worker):
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(message), proc.stderr
    assert origin.requests_for("/x.txt") == []


# --- the embedded server -----------------------------------------------------------------------------------


def _ask(port: int, command: bytes) -> bytes:
    """One raw RESP command, as any local user could send it (no client library retrying on errors)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(command)
        return s.recv(200)


def test_local_mode_server_requires_a_password_that_no_command_line_shows(origin, tmp_path):
    origin.add("/slow.bin", b"s" * 100_000, rate=20_000)
    listing = write_list(tmp_path / "urls.txt", [origin.url("/slow.bin")])
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "--concurrency", "1"], cwd=tmp_path,
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        port = int(re.search(r"embedded server on 127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))
        assert _ask(port, b"LRANGE fleetfetch 0 -1\r\n").startswith(b"-NOAUTH")
        assert _ask(port, b"LPUSH fleetfetch x\r\n").startswith(b"-NOAUTH")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("valkey" in c.name() or "redis" in c.name() for c in children)
        # the config file, in the local cluster's private temp directory (the newest one: this run's)
        conf = max(Path(tempfile.gettempdir()).glob("fleetfetch-local-*/server.conf"),
                   key=lambda p: p.stat().st_mtime)
        password = conf.read_text().split()[1]
        assert conf.stat().st_mode & 0o777 == 0o600 and conf.parent.stat().st_mode & 0o777 == 0o700
        assert _ask(port, f"AUTH {password}\r\n".encode()) == b"+OK\r\n"
        for child in [psutil.Process(proc.pid), *children]:
            assert password not in " ".join(child.cmdline())
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert password not in out + err
