"""Robust fetching, through real workers (processes, or in this process) and Redis, asserting both the outcome and
what the origin received."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.realparts.origin import DROP
from bench.realparts.servers import RedisServer, Worker
from tasks import labels
from tasks.naming import with_hash
from tests.conftest import ROOT, Cluster, read_manifest, write_list


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(cluster, tmp_path, lines, *args):
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "--manifest", str(manifest), *args)
    return result, (read_manifest(manifest) if manifest.exists() else [])


# The four below run on a worker in this process (the fast tier): a `celery worker` process adds nothing to them.
@pytest.mark.fast
def test_transient_statuses_are_retried_and_retry_after_is_honoured(in_process, origin, tmp_path):
    origin.add("/flaky.bin", b"finally")
    origin.fail("/flaky.bin", [(503, {"Retry-After": "1"}), 502])
    with in_process().running() as w:
        records = w.run([origin.url("/flaky.bin")], tmp_path / "urls.txt", subdir="retry")
    assert records[0]["status"] == "done", records
    assert (w.settings.download_dir / "retry" / "flaky.bin").read_bytes() == b"finally"
    assert records[0]["attempts"] == 3
    seen = origin.requests_for("/flaky.bin")
    assert len(seen) == 3
    assert seen[1].time - seen[0].time >= 0.95  # Retry-After: 1 was respected


@pytest.mark.fast
def test_permanent_4xx_is_not_retried(in_process, origin, tmp_path):
    origin.fail("/forbidden", [403] * 5)
    with in_process().running() as w:
        records = w.run([origin.url("/forbidden")], tmp_path / "urls.txt", subdir="perm")
    assert records[0]["status"] == "failed" and records[0]["reason"].startswith("403")
    assert records[0]["attempts"] == 1 and len(origin.requests_for("/forbidden")) == 1


@pytest.mark.fast
def test_attempts_run_out_with_the_last_error_in_the_record(in_process, origin, tmp_path):
    origin.fail("/down", [503] * 10)
    with in_process().running() as w:
        records = w.run([origin.url("/down")], tmp_path / "urls.txt", subdir="exhausted", max_attempts=2)
    assert records[0]["status"] == "failed"
    assert records[0]["attempts"] == 2 and records[0]["reason"].startswith("503")
    assert len(origin.requests_for("/down")) == 2


@pytest.mark.fast
def test_cut_connection_resumes_with_range_and_if_range(in_process, origin, tmp_path):
    body = os.urandom(2 * 1024 * 1024 + 123)
    origin.add("/cut.bin", body, etag='"v1"', cut_after=700_000, cut_times=1)
    with in_process().running() as w:
        records = w.run([origin.url("/cut.bin")], tmp_path / "urls.txt", subdir="resume")
    assert records[0]["status"] == "done", records
    assert (w.settings.download_dir / "resume" / "cut.bin").read_bytes() == body
    assert records[0]["sha256"] == sha(body) and records[0]["attempts"] == 2
    first, second = origin.requests_for("/cut.bin")
    assert "range" not in {k.lower() for k in first.headers}
    offset = int(second.headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 700_000 and second.headers["If-Range"] == '"v1"'


def test_server_ignoring_range_restarts_from_zero(cluster, worker, origin, tmp_path):
    body = os.urandom(1024 * 1024)
    origin.add("/norange.bin", body, etag='"n1"', cut_after=300_000, cut_times=1, ranges=False)
    result, records = run(cluster, tmp_path, [origin.url("/norange.bin")], "-d", "norange")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (cluster.downloads / "norange" / "norange.bin").read_bytes() == body
    assert records[0]["sha256"] == sha(body)


def test_expected_digest_mismatch_fails_and_leaves_no_file(cluster, worker, origin, tmp_path):
    origin.add("/good.bin", b"good")
    origin.add("/bad.bin", b"tampered")
    lines = [f"{origin.url('/good.bin')} sha256={sha(b'good')}", f"{origin.url('/bad.bin')} sha256={sha(b'orig')}"]
    result, records = run(cluster, tmp_path, lines, "-d", "digest")
    assert result.returncode == 1
    assert records[0]["status"] == "done"
    assert f"expected {sha(b'orig')}, got {sha(b'tampered')}" in records[1]["reason"]
    out = cluster.downloads / "digest"
    assert not (out / "bad.bin").exists() and not list(out.glob(".*.part"))


def test_max_size_stops_with_or_without_content_length(cluster, worker, origin, tmp_path):
    origin.add("/big-cl.bin", b"x" * 300_000)
    origin.add("/big-nocl.bin", b"y" * 3_000_000, no_length=True)
    origin.add("/fits.bin", b"z" * 1000)
    lines = [origin.url("/big-cl.bin"), origin.url("/big-nocl.bin"), origin.url("/fits.bin")]
    result, records = run(cluster, tmp_path, lines, "-d", "maxsize", "--max-size", "100000")
    assert result.returncode == 1
    assert [r["status"] for r in records] == ["failed", "failed", "done"]
    assert all("too large" in r["reason"] for r in records[:2])
    out = cluster.downloads / "maxsize"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["fits.bin"]


def test_stalled_body_times_out_instead_of_hanging(cluster, worker, origin, tmp_path):
    origin.add("/stall.bin", b"s" * 200_000, stall=30)
    result, records = run(cluster, tmp_path, [origin.url("/stall.bin")], "-d", "stall", "--max-attempts", "1")
    assert result.returncode == 1
    assert "timed out" in records[0]["reason"]


def test_redirect_loop_and_too_many_redirects_fail_clearly(cluster, worker, origin, tmp_path):
    origin.redirect("/loop-a", "/loop-b")
    origin.redirect("/loop-b", "/loop-a")
    for i in range(12):
        origin.redirect(f"/hop{i}", f"/hop{i + 1}")
    origin.add("/hop12", b"end")
    result, records = run(cluster, tmp_path, [origin.url("/loop-a"), origin.url("/hop0")], "-d", "redir")
    assert result.returncode == 1
    assert "redirect loop" in records[0]["reason"]
    assert "too many redirects" in records[1]["reason"]


def test_rerun_sends_conditional_headers_and_keeps_unchanged_files(cluster, worker, origin, tmp_path):
    origin.add("/doc.pdf", b"version 1", etag='"e1"', last_modified="Wed, 21 Oct 2015 07:28:00 GMT")
    lines = [origin.url("/doc.pdf")]
    first, _ = run(cluster, tmp_path, lines, "-d", "rerun")
    assert first.returncode == 0
    target = cluster.downloads / "rerun" / "doc.pdf"
    mtime = target.stat().st_mtime_ns
    label = json.loads(os.getxattr(target, labels.XATTR))  # the validators travel on the file itself
    assert label["etag"] == '"e1"' and label["sha256"] == sha(b"version 1") and label["mtime_ns"] == mtime
    assert not (cluster.downloads / ".fleetfetch" / "rerun" / "doc.pdf.json").exists()  # no sidecar file
    second, records = run(cluster, tmp_path, lines, "-d", "rerun")
    assert second.returncode == 0 and "1 unchanged" in second.stdout
    assert records[0]["status"] == "unchanged" and records[0]["sha256"] == sha(b"version 1")
    conditional = origin.requests_for("/doc.pdf")[-1]
    assert conditional.headers["If-None-Match"] == '"e1"'
    assert conditional.headers["If-Modified-Since"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert target.stat().st_mtime_ns == mtime
    origin.add("/doc.pdf", b"version 2", etag='"e2"')
    third, records = run(cluster, tmp_path, lines, "-d", "rerun")
    assert records[0]["status"] == "done" and target.read_bytes() == b"version 2"
    forced, records = run(cluster, tmp_path, lines, "-d", "rerun", "--force")
    assert records[0]["status"] == "done"
    assert "If-None-Match" not in origin.requests_for("/doc.pdf")[-1].headers


def test_a_changed_file_on_disk_is_downloaded_again(cluster, worker, origin, tmp_path):
    origin.add("/local.txt", b"original", etag='"l1"')
    lines = [origin.url("/local.txt")]
    run(cluster, tmp_path, lines, "-d", "tamper")
    target = cluster.downloads / "tamper" / "local.txt"
    target.write_bytes(b"edited by hand, longer")
    result, records = run(cluster, tmp_path, lines, "-d", "tamper")
    assert records[0]["status"] == "done" and target.read_bytes() == b"original"
    assert "If-None-Match" not in origin.requests_for("/local.txt")[-1].headers


def test_content_disposition_names_are_opt_in_sanitised_and_never_overwrite(cluster, worker, origin, tmp_path):
    cases = {"/dl?id=1": ('attachment; filename="report.pdf"', b"one"),
             "/dl?id=2": ('attachment; filename="report.pdf"', b"two"),
             "/dl?id=3": ('attachment; filename="../../escape.txt"', b"three"),
             "/dl?id=4": ('attachment; filename="/etc/passwd"', b"four"),
             "/dl?id=5": ('attachment; filename="..\\\\win.ini"', b"five"),
             "/dl?id=6": ("attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.txt", b"six")}
    for path, (header, body) in cases.items():
        origin.add(path, body, content_disposition=header)
    lines = [origin.url(p) for p in cases]
    result, records = run(cluster, tmp_path, lines, "-d", "cd", "--content-disposition")
    assert result.returncode == 0, result.stdout + result.stderr
    out = cluster.downloads / "cd"
    names = [Path(r["path"]).name for r in records]
    # Both servers say report.pdf: whichever download finishes first (they run side by side) gets it, the other
    # gets the name made unique by its URL's hash; neither overwrites the other.
    assert sorted(names[:2], key=len)[0] == "report.pdf" and names[0] != names[1]
    assert all(names[i] in ("report.pdf", with_hash("report.pdf", lines[i])) for i in (0, 1))
    assert names[2:] == ["escape.txt", "passwd", "win.ini", "résumé.txt"]
    for name, (_, body) in zip(names, cases.values(), strict=True):
        assert (out / name).read_bytes() == body
    assert not list(cluster.downloads.parent.rglob("escape.txt"))[1:]  # only the one inside the job directory
    plain, records = run(cluster, tmp_path, [origin.url("/dl?id=1")], "-d", "cd-off")
    assert Path(records[0]["path"]).name == "dl"  # without the option the URL decides


@pytest.mark.root
def test_without_extended_attributes_the_validators_go_to_a_sidecar(origin, tmp_path):
    """ramfs takes no user.* attributes: the worker keeps a sidecar under .fleetfetch/, and a re-run still sends
    a conditional request and keeps the unchanged file."""
    mount = tmp_path / "ramfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], check=True)
    try:
        with RedisServer(tmp_path / "redis") as server:  # its own: the module's worker must not take these URLs
            plain = Cluster(server, mount / "dl")
            origin.add("/plain.pdf", b"on ramfs", etag='"r1"')
            with Worker(plain.env, name="ramfs", concurrency=1, log=tmp_path / "w.log", cwd=ROOT):
                first, _ = run(plain, tmp_path, [origin.url("/plain.pdf")], "-d", "r")
                second, records = run(plain, tmp_path, [origin.url("/plain.pdf")], "-d", "r")
        assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
        sidecar = mount / "dl" / ".fleetfetch" / "r" / "plain.pdf.json"
        assert json.loads(sidecar.read_text())["etag"] == '"r1"'
        assert records[0]["status"] == "unchanged"
        assert origin.requests_for("/plain.pdf")[-1].headers["If-None-Match"] == '"r1"'
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_connection_is_kept_alive_and_one_the_server_drops_is_replaced_at_once(origin, tmp_path):
    """One download thread fetches one origin's files over one connection, as curl does. When the server closes
    that kept connection just as the next request arrives, the request goes out again at once on a new one:
    the URL is done in its first attempt (no retry later, no halving of the host's window)."""
    for i in range(4):
        origin.add(f"/k{i}", f"kept {i}".encode() * 1000)
    origin.fail("/k3", [DROP])
    with RedisServer(tmp_path / "redis") as server:  # its own: one thread, so the URLs go in order on one thread
        own = Cluster(server, tmp_path / "dl")
        with Worker(own.env, name="alive", concurrency=1, pool="threads", log=tmp_path / "w.log", cwd=ROOT):
            result, records = run(own, tmp_path, [origin.url(f"/k{i}") for i in range(4)], "-d", "k")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["status"] for r in records] == ["done"] * 4 and [r["attempts"] for r in records] == [1] * 4
    for i in range(4):
        assert (own.downloads / "k" / f"k{i}").read_bytes() == f"kept {i}".encode() * 1000
    ports = [r.port for r in origin.requests]
    assert [r.path for r in origin.requests] == ["/k0", "/k1", "/k2", "/k3", "/k3"]
    assert len(set(ports[:4])) == 1, ports  # one connection for the first four requests
    assert ports[4] != ports[3]  # the dropped one replaced by a new connection
    assert "at once from now on" not in (tmp_path / "w.log").read_text()


def test_a_worker_at_info_logs_one_line_per_url(cluster, worker, origin, tmp_path):
    """`--loglevel=INFO`: the task's own line per URL (and one per retry), not Celery's received/succeeded pair."""
    origin.add("/logged.bin", b"one line")
    origin.fail("/logged.bin", [503])
    result, _ = run(cluster, tmp_path, [origin.url("/logged.bin")], "-d", "logs")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in worker.log_text().splitlines() if "logged.bin" in line]
    assert any("Finished logged.bin: done, 8 bytes" in line for line in lines), lines
    assert any("Retrying logged.bin" in line for line in lines), lines
    assert len(lines) == 2, lines  # no "Task ... received", "succeeded in", "Starting download"
