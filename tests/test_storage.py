"""Storage against a booby-trapped directory; fetch on real sockets: failure reasons, kernel timeouts (units)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tasks import fetch, guard, labels, storage, urllib3_hooks
from tasks.errors import PermanentError, TransientError

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)


def test_a_planted_hard_link_or_fifo_is_dropped_and_a_fresh_temp_file_created(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "dl").mkdir()
    os.link(victim, tmp_path / "dl" / ".a.part")
    os.mkfifo(tmp_path / "dl" / ".b.part")
    with storage.TargetDir(tmp_path / "dl", "") as where:
        for name in ("a", "b"):
            part = storage.PartFile(where, name)
            part.restart()
            part.write(b"new bytes")
            part.commit(fsync=False)
    assert victim.read_bytes() == b"keep me" and os.stat(victim).st_nlink == 1
    assert (tmp_path / "dl" / "a").read_bytes() == (tmp_path / "dl" / "b").read_bytes() == b"new bytes"


def test_only_the_part_file_an_attempt_recorded_is_resumed(tmp_path):
    with storage.TargetDir(tmp_path, "") as where:
        part = storage.PartFile(where, "f")
        part.write(b"first half")
        recorded = part.identity()
        part.close()
        again = storage.PartFile(where, "f")
        assert again.keep_prefix(recorded) == len(b"first half")
        again.close()
        os.unlink(tmp_path / ".f.part")  # someone else's file now stands under the same name
        (tmp_path / ".f.part").write_bytes(b"planted bytes")
        other = storage.PartFile(where, "f")
        assert other.keep_prefix(recorded) == 0 and os.path.getsize(tmp_path / ".f.part") == 0
        assert other.keep_prefix(None) == 0 and other.keep_prefix("garbage") == 0
        other.close()


def test_sub_directories_are_walked_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "dl"
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "file").write_text("x")
    for subdir in ("link/new", "link"):
        with pytest.raises(PermanentError, match="leads outside the download directory"):
            storage.TargetDir(root, subdir)
    with pytest.raises(PermanentError, match="'file' is a file there, not a directory"):
        storage.TargetDir(root, "file/new")
    assert list(outside.iterdir()) == []
    with storage.TargetDir(root, "a/b") as where:
        assert where.path == root / "a" / "b" and (root / "a" / "b").is_dir()


def _limits() -> fetch.Limits:
    return fetch.Limits(2, 2, 3, guard.Policy(allow_networks=(guard.ipaddress.ip_network("127.0.0.1/32"),)))


def _one_shot_server(behaviour: str) -> tuple[int, threading.Thread]:
    """A listener on 127.0.0.1 that answers one connection by resetting it or closing it without a word."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            conn.recv(4096)
            if behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv.getsockname()[1], thread


@pytest.mark.parametrize("behaviour, reason", [("reset", "connection reset by peer"),
                                               ("close", "connection closed without a response")])
def test_connection_failures_are_named_by_exception_type_and_errno(behaviour, reason):
    port, thread = _one_shot_server(behaviour)
    with pytest.raises(TransientError) as failed:
        fetch.open_response(f"http://127.0.0.1:{port}/x", {}, _limits())
    thread.join(5)
    assert failed.value.reason == reason


def test_a_closed_port_is_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(TransientError) as failed:
            fetch.open_response(f"http://127.0.0.1:{port}/x", {}, _limits())
    assert failed.value.reason == "connection refused"


def test_the_deadline_is_checked_before_connecting():
    with pytest.raises(PermanentError, match="time limit exceeded"):
        fetch.open_response("http://127.0.0.1:9/x", {}, _limits(), deadline=0.0)


def test_sidecars_never_follow_a_planted_link(tmp_path):
    outside = tmp_path / "victim.json"
    outside.write_text("{}")
    root = tmp_path / "dl"
    with storage.TargetDir(root, "") as where:
        where.check_meta()
        (root / ".fleetfetch" / "f.json").symlink_to(outside)
        assert labels.load_validators(where, "f", "http://h/f") is None
        labels.save_validators(where, "f", labels.Validators(storage.url_key("http://h/f"), 1, "0" * 64))
    assert outside.read_text() == "{}" and not (root / ".fleetfetch" / "f.json").is_symlink()
    assert Path(root / ".fleetfetch" / "f.json").read_text().startswith('{"url": "sha256:')


def test_the_metadata_directory_is_checked_once_and_a_link_planted_later_is_still_never_followed(tmp_path):
    """The early check of `.fleetfetch/<subdir>` runs once per directory per process (it cost 8 system calls per
    URL); what keeps every write inside the download directory is the checked descent at each use."""
    outside, root, url = tmp_path / "outside", tmp_path / "dl", "http://h/f"
    outside.mkdir()
    with storage.TargetDir(root, "sub") as where:
        where.check_meta()
    shutil.rmtree(root / ".fleetfetch" / "sub")
    (root / ".fleetfetch" / "sub").symlink_to(outside, target_is_directory=True)
    with storage.TargetDir(root, "sub") as where:
        where.check_meta()  # checked already in this process: not looked at again
        with pytest.raises(PermanentError, match="leads outside the download directory"):
            labels.save_validators(where, "f", labels.Validators(storage.url_key(url), 1, "0" * 64))
    assert list(outside.iterdir()) == []
    with storage.TargetDir(root, "other") as where:
        (root / ".fleetfetch" / "other").symlink_to(outside, target_is_directory=True)
        with pytest.raises(PermanentError, match="leads outside the download directory"):
            where.check_meta()  # a directory not checked yet is refused before anything is asked of the server


def test_a_durable_part_file_hands_its_pages_to_the_disk_on_the_way_and_commits_whole(tmp_path):
    """fsync on: every FLUSH_EVERY bytes the written pages start their writeback (posix_fadvise DONTNEED) while
    the body still arrives; the file and its hash are whole whether a chunk ends on the step or not."""
    import hashlib

    chunks = [os.urandom(1 << 20) for _ in range(3)]
    body = b"".join(chunks[i % 3] for i in range(40)) + b"tail"
    with storage.TargetDir(tmp_path, "") as where:
        part = storage.PartFile(where, "big.bin", durable=True)
        for i in range(40):
            part.write(chunks[i % 3])
            assert part._flushed == (part.size // storage.FLUSH_EVERY) * storage.FLUSH_EVERY
        part.write(b"tail")
        digest = part.hash.hexdigest()
        part.commit(fsync=True)
    assert (tmp_path / "big.bin").read_bytes() == body
    assert digest == hashlib.sha256(body).hexdigest()
    assert not (tmp_path / ".big.bin.part").exists()


def test_a_plain_http_download_waits_in_the_kernel_and_a_stall_still_times_out(origin):
    """A plain http:// connection's socket is blocking in Python, so a read is one system call (no poll before
    it, no ioctl to change its timeout): one hand-off of the GIL instead of two or three. Its timeout is the
    kernel's, and follows each change urllib3 and the deadline make. A body that stalls longer fails as a read
    timeout, and the connection is kept alive between requests. (TLS connections keep Python's own timeouts.)"""
    body = b"x" * 300_000
    origin.add("/ok.bin", body)
    origin.add("/stall.bin", body, stall=5)
    limits = fetch.Limits(2, 0.5, 3, guard.Policy(allow_networks=(guard.ipaddress.ip_network("127.0.0.1/32"),)))
    response = fetch.open_response(origin.url("/ok.bin"), {}, limits)
    sock = response.raw.connection.sock
    assert isinstance(sock, urllib3_hooks.KernelTimeoutSocket)
    assert socket.socket.gettimeout(sock) is None and sock.getblocking()  # Python never polls it
    assert sock.gettimeout() == 0.5
    assert struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)) == (0, 500_000)
    assert b"".join(fetch.body_chunks(response, 0.5, size=65536)) == body
    response = fetch.open_response(origin.url("/stall.bin"), {}, limits)
    assert response.raw.connection.sock is sock  # the same connection, kept alive
    began = time.monotonic()
    with pytest.raises(TransientError, match=r"read timed out after 0\.5 s \(stalled\)"):
        b"".join(fetch.body_chunks(response, 0.5, time.monotonic() + 60))
    assert 0.4 < time.monotonic() - began < 3
