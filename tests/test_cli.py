"""Bad input gets one readable line and a documented exit code; nothing is enqueued."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from bench.realparts.servers import free_port
from tasks.config import QUEUE
from tests.conftest import base_env, write_list

BAD_LINES = [
    ("ftp://files.example/x.pdf", "not an http(s) URL: 'ftp://files.example/x.pdf'"),
    ("www.irs.gov/f1040.pdf", "not an http(s) URL"),
    ("http://h:99999/x", "not a valid URL"),
    ("http://h/x.pdf trailing", "unexpected text after the URL"),
    ("http://h/x.pdf sha256=1234", "invalid digest"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_a_bad_line_stops_the_job_before_anything_is_enqueued(cluster, tmp_path, bad, message):
    listing = write_list(tmp_path / "urls.txt", ["# a comment", "", "http://127.0.0.1/ok.pdf", bad])
    before = cluster.broker().llen(QUEUE)
    result = cluster.producer(str(listing))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {listing}:4: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert cluster.broker().llen(QUEUE) == before


def test_missing_file_and_empty_list(cluster, tmp_path):
    result = cluster.producer(str(tmp_path / "nope.txt"))
    assert result.returncode == 2 and "nope.txt: no such file" in result.stderr
    empty = write_list(tmp_path / "empty.txt", ["# only comments"])
    result = cluster.producer(str(empty))
    assert result.returncode == 2 and "no URLs in the list" in result.stderr


def test_unreachable_broker_exit_3_with_password_masked(tmp_path):
    port = free_port()
    env = base_env(CELERY_BROKER_URL=f"redis://:s3cretpw@127.0.0.1:{port}/0")
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x.pdf"])
    result = subprocess.run([sys.executable, "-m", "producer", str(listing)], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3
    assert "s3cretpw" not in result.stderr + result.stdout
    assert f"redis://:****@127.0.0.1:{port}/0" in result.stderr
    assert "local mode" in result.stderr and "Traceback" not in result.stderr


def test_stdin_list_and_help_documents_every_option(cluster, worker, origin):
    origin.add("/in.txt", b"from stdin")
    result = cluster.producer("-", "-d", "stdin", stdin=origin.url("/in.txt") + "\n")
    assert result.returncode == 0, result.stderr
    assert (cluster.downloads / "stdin" / "in.txt").read_bytes() == b"from stdin"
    helptext = cluster.producer("--help").stdout
    for option in ("--dir", "--manifest", "--no-wait", "--concurrency", "--quiet", "--max-size", "--force",
                   "exit codes"):
        assert option in helptext


def test_cluster_dir_must_be_relative(cluster, tmp_path):
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/x"])
    result = cluster.producer(str(listing), "-d", "../outside")
    assert result.returncode == 2 and "relative sub-directory" in result.stderr


def _one_error_line(result, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and all(w in result.stderr for w in words), result.stderr


def test_a_manifest_path_that_is_not_a_regular_files_place_is_refused_before_the_job(cluster, tmp_path):
    """A symlink, a device or a missing directory as --manifest: one line, exit 2, nothing enqueued, nothing
    replaced (a device node of our own stands for /dev/null)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch")
    (tmp_path / "link.jsonl").symlink_to(victim)
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/x.pdf"])
    before = cluster.broker().llen(QUEUE)
    cases = {"link.jsonl": "is a symlink", "null": "not a regular file", "missing/m.jsonl": "does not exist"}
    for name, words in cases.items():
        _one_error_line(cluster.producer(str(listing), "--manifest", str(tmp_path / name)), name, words)
        _one_error_line(cluster.producer("results", "20260101-000000-abcdef", "--manifest", str(tmp_path / name)),
                        name, words)
    assert cluster.broker().llen(QUEUE) == before
    assert (tmp_path / "link.jsonl").is_symlink() and victim.read_text() == "do not touch"
    assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode)


def test_bad_local_paths_and_counts_are_one_line_before_anything_runs(tmp_path):
    """-d naming a file, a negative --concurrency: one line, exit 2, no embedded server started."""
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1:9/x.pdf"])
    afile = tmp_path / "afile"
    afile.write_text("not a directory")

    def local(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "producer", *args], env=base_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)

    _one_error_line(local(str(listing), "-d", str(afile)), str(afile), "not a directory")
    _one_error_line(local("status", "20260101-000000-abcdef", "-d", str(afile)), "not a directory")
    _one_error_line(local(str(listing), "--concurrency", "-1"), "--concurrency")
    assert not (tmp_path / "downloads").exists()


def test_error_lines_never_echo_secrets(cluster, tmp_path):
    lines = ["ftp://alice:hunter2@127.0.0.1/x.pdf", "http://127.0.0.1:99999/z.pdf?token=tok-s3cret",
             "http://127.0.0.1/a.pdf password=pw-s3cret", "http://127.0.0.1/b.pdf", "  header=Bearer hdr-s3cret",
             "  X-Api-Key: key-s3cret"]
    listing = write_list(tmp_path / "urls.txt", lines)
    result = cluster.producer(str(listing))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == len(lines) - 1 + 1
    assert "ftp://****@127.0.0.1/x.pdf" in result.stderr and "token=****" in result.stderr
    (tmp_path / "cookies.txt").write_text("allowed.test\tFALSE\t/\tFALSE\tsoon\tsid\tck-s3cret\n")
    (tmp_path / "netrc").write_text("machine h login alice nt-s3cret\n")
    cookies = cluster.producer(str(listing), "--load-cookies", str(tmp_path / "cookies.txt"))
    netrc = cluster.producer(str(listing), "--netrc-file", str(tmp_path / "netrc"))
    assert cookies.returncode == 2 and netrc.returncode == 2
    assert netrc.stderr.startswith(f"error: --netrc-file {tmp_path / 'netrc'}:")
    shown = result.stderr + cookies.stderr + netrc.stderr
    assert "Traceback" not in shown and len((cookies.stderr + netrc.stderr).strip().splitlines()) == 2
    for secret in ("hunter2", "tok-s3cret", "pw-s3cret", "hdr-s3cret", "key-s3cret", "ck-s3cret", "nt-s3cret"):
        assert secret not in shown, shown


def test_a_run_in_cluster_mode_says_which_broker_it_uses(cluster, tmp_path):
    """A producer with no settings starts local mode, a worker with none uses a Redis on this machine: each says
    which broker it uses, so a user sees why the two never meet."""
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/said.bin"])
    result = cluster.producer(str(listing), "--no-wait", "--queue", "no-worker-serves-this")  # never downloaded
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"cluster mode: broker {cluster.env['CELERY_BROKER_URL']}, result backend "), \
        result.stdout
