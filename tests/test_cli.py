"""Bad input gets one readable line and a documented exit code; nothing is enqueued."""

from __future__ import annotations

import pytest

from tasks.config import QUEUE
from tests.conftest import base_env, write_list
from tests.support.servers import free_port

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
    import subprocess
    import sys

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


def test_a_run_in_cluster_mode_says_which_broker_it_uses(cluster, tmp_path):
    """A producer with no settings starts local mode, a worker with none uses a Redis on this machine: each says
    which broker it uses, so a user sees why the two never meet."""
    listing = write_list(tmp_path / "urls.txt", ["http://127.0.0.1/said.bin"])
    result = cluster.producer(str(listing), "--no-wait", "--queue", "no-worker-serves-this")  # never downloaded
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"cluster mode: broker {cluster.env['CELERY_BROKER_URL']}, result backend "), \
        result.stdout
