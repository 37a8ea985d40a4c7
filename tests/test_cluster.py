"""Cluster mode end to end: producer -> Redis -> a real worker (a `celery worker` process, or one in this
process) -> verified files and records."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from celery.result import AsyncResult

from tasks.app import app
from tests.conftest import job_id_of, write_list


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.fast
def test_job_downloads_every_file_and_records_each_url(in_process, origin, tmp_path):
    """A job of the producer's ledger and messages, on a real worker in this process (the CLI and a `celery
    worker` process: the other tests here)."""
    files = {"/small.txt": b"hello\n", "/big.bin": os.urandom(3 * 1024 * 1024 + 7), "/empty.dat": b"",
             "/dir/my%20file.pdf": b"%PDF spaces", "/caf%C3%A9.txt": b"unicode name"}
    for path, body in files.items():
        origin.add(path, body, etag=f'"{sha(body)[:8]}"')
    origin.add("/page?x=1", b"page one")
    origin.add("/page?x=2", b"page two")
    origin.redirect("/old", "/small.txt")
    urls = [origin.url(p) for p in [*files, "/page?x=1", "/page?x=2", "/old"]]
    urls.append(origin.url("/small.txt"))  # a duplicate line is downloaded once
    with in_process().running() as w:
        records = w.run(urls, tmp_path / "urls.txt", subdir="basic")
    downloads = w.settings.download_dir
    out = downloads / "basic"
    expected = {"small.txt": b"hello\n", "big.bin": files["/big.bin"], "empty.dat": b"",
                "my file.pdf": b"%PDF spaces", "café.txt": b"unicode name", "page": b"page one"}
    for name, body in expected.items():
        assert (out / name).read_bytes() == body, name
    assert len(records) == len(urls) - 1
    assert [r["index"] for r in records] == list(range(len(records)))
    assert all(r["status"] == "done" for r in records)
    by_url = {r["url"]: r for r in records}
    big = by_url[origin.url("/big.bin")]
    assert big["bytes"] == len(files["/big.bin"]) and big["sha256"] == sha(files["/big.bin"])
    assert big["http_status"] == 200 and big["etag"] and big["worker"] and big["elapsed_s"] >= 0
    page2 = by_url[origin.url("/page?x=2")]
    assert page2["path"] != "page" and (downloads / page2["path"]).read_bytes() == b"page two"
    moved = by_url[origin.url("/old")]
    assert moved["final_url"] == origin.url("/small.txt")
    assert (downloads / moved["path"]).read_bytes() == b"hello\n"
    assert not [p for p in out.iterdir() if p.name.endswith(".part")]


def test_failures_end_as_failed_records_with_reasons_and_exit_1(cluster, worker, origin, tmp_path):
    origin.add("/ok.txt", b"fine")
    origin.fail("/boom", [500] * 10)
    origin.add("/short.bin", b"x" * 100_000, cut_after=1000, cut_times=100)
    urls = [origin.url("/ok.txt"), origin.url("/missing.pdf"), origin.url("/boom"), origin.url("/short.bin"),
            "http://127.0.0.1:1/refused.txt"]
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", urls)), "-d", "failures")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"failed: {origin.url('/missing.pdf')}: 404" in result.stdout
    assert f"failed: {origin.url('/boom')}: 500" in result.stdout
    assert f"failed: {origin.url('/short.bin')}: body cut short" in result.stdout
    assert "failed: http://127.0.0.1:1/refused.txt: connection refused" in result.stdout
    out = cluster.downloads / "failures"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".fleetfetch")) == ["ok.txt"]
    job = job_id_of(result.stdout)
    # The same failure is visible to Celery (and so Flower) as a failed task with the one-line reason.
    app.conf.update(result_backend=cluster.env["CELERY_RESULT_BACKEND"])
    failed = AsyncResult(f"{job}-1", app=app)
    assert failed.state == "FAILURE"
    assert f"{origin.url('/missing.pdf')}: 404" in str(failed.result)
    # A success leaves no Celery result (the ledger's record is the one kept): no second copy per URL in Redis.
    assert AsyncResult(f"{job}-0", app=app).state == "PENDING"
    assert cluster.backend().get(f"celery-task-meta-{job}-0") is None


def test_status_and_results_work_after_the_producer_exits(cluster, worker, origin, tmp_path):
    origin.add("/a.txt", b"a")
    origin.add("/b.txt", b"b")
    listing = write_list(tmp_path / "urls.txt", [origin.url("/a.txt"), origin.url("/b.txt")])
    result = cluster.producer(str(listing), "-d", "later", "--no-wait")
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().splitlines()[-1]
    follow = cluster.producer("resume", job)  # nothing left to publish: it just follows the job to its end
    assert follow.returncode == 0 and "published 0 URLs" in follow.stdout
    status = cluster.producer("status", job)
    assert status.returncode == 0
    assert "done 2" in status.stdout and "failed 0" in status.stdout
    records = [json.loads(line) for line in cluster.producer("results", job).stdout.splitlines()]
    assert [r["status"] for r in records] == ["done", "done"]
    assert records[0]["sha256"] == sha(b"a")
    assert cluster.producer("status", "no-such-job").returncode == 2


def test_traversal_in_urls_never_writes_outside_the_download_dir(cluster, worker, origin, tmp_path):
    paths = ["/..%2F..%2Fescape.txt", "/%2e%2e%2f%2e%2e%2fescape2.txt", "/..%5C..%5Cescape3.txt",
             "/%2E%2E%2F%2E%2E%2Fetc%2Fescape4"]
    for p in paths:
        origin.add(p, b"contained")
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", [origin.url(p) for p in paths])),
                              "-d", "traversal")
    assert result.returncode == 0, result.stdout + result.stderr
    out = cluster.downloads / "traversal"
    names = [p.name for p in out.iterdir() if p.is_file()]
    assert len(names) == len(paths)
    assert all((out / n).read_bytes() == b"contained" for n in names)
    outside = [p for p in cluster.downloads.parent.rglob("escape*") if cluster.downloads not in p.parents]
    assert outside == []
