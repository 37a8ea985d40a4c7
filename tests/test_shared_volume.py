"""A big file's pieces spread over two workers that share the download directory (FLEETFETCH_SHARED_VOLUME=1):
real workers, a real Redis, an origin on loopback with a per-connection rate."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from bench.realparts.origin import Origin
from tests.conftest import FAST_HEAL, Cluster, read_manifest, write_list

RATE = 1_000_000  # bytes/s per connection: one stream is slow
SPLIT = ("--split", "4", "--min-split-size", "1M")
# Bytes an origin writes into a connection that its client closes early (the first stream stops where the pieces
# begin): what the sockets had buffered, never kept.
BUFFERED = 256 << 10


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_job(cluster: Cluster, tmp_path: Path, url: str, *args: str):
    return cluster.producer_async(str(write_list(tmp_path / "urls.txt", [url])), "-d", "shared", "--manifest",
                                  str(tmp_path / "m.jsonl"), *SPLIT, *args)


def finish(proc, tmp_path: Path) -> dict:
    try:
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    records = read_manifest(tmp_path / "m.jsonl")
    assert len(records) == 1, records  # the URL keeps one record: helpers write none
    return records[0]


def wait_for(origin: Origin, path: str, sent: int) -> None:
    deadline = time.monotonic() + 60
    while origin.sent.get(path, 0) < sent and time.monotonic() < deadline:
        time.sleep(0.02)


def test_two_workers_sharing_a_directory_split_one_file_between_them(chaos, workers, origin, tmp_path):
    chaos.env["FLEETFETCH_SHARED_VOLUME"] = "1"
    body = os.urandom(16 << 20)
    origin.add("/big.bin", body, etag='"b1"', rate=RATE)
    a, b = workers.start("a", concurrency=2), workers.start("b", concurrency=2)
    rec = finish(start_job(chaos, tmp_path, f"{origin.url('/big.bin')} sha256={sha(body)}"), tmp_path)
    assert (chaos.downloads / "shared" / "big.bin").read_bytes() == body
    assert rec["status"] == "done" and rec["sha256"] == sha(body), rec
    by = dict(w.rsplit(":", 1) for w in rec["fetched_by"].split())
    assert rec["workers"] == 2 and sorted(w.split("@")[0] for w in by) == ["a", "b"], rec  # both fetched pieces
    assert sum(map(int, by.values())) == rec["segments"] and rec["connections"] >= 3, rec
    assert origin.sent["/big.bin"] <= len(body) + (1 << 20)
    assert not list((chaos.downloads / "shared").glob(".*.part*"))
    assert "fleetfetch.segment" in a.log_text() + b.log_text()


def test_per_host_2_holds_across_both_workers(chaos, workers, origin, tmp_path):
    chaos.env["FLEETFETCH_SHARED_VOLUME"] = "1"
    body = os.urandom(8 << 20)
    origin.add("/polite.bin", body, etag='"p1"', rate=RATE)
    workers.start("a", concurrency=2)
    workers.start("b", concurrency=2)
    rec = finish(start_job(chaos, tmp_path, origin.url("/polite.bin"), "--per-host", "2"), tmp_path)
    assert (chaos.downloads / "shared" / "polite.bin").read_bytes() == body and rec["sha256"] == sha(body)
    assert origin.max_concurrent <= 2, origin.max_concurrent
    assert rec["connections"] >= 2, rec


def fetchers(cluster: Cluster) -> dict[str, str]:
    """worker -> "owner" or "helper", from the pieces done so far (the owner's connections are "worker task/thread",
    a helper's "worker task")."""
    found: dict[str, str] = {}
    r = cluster.backend()
    for key in r.scan_iter("ff:{*}:seg:*:done"):
        for who in r.hvals(key):
            worker, _, rest = who.decode().partition(" ")
            if found.get(worker) != "owner":
                found[worker] = "owner" if "/" in rest else "helper"
    return found


def two_workers_fetching(chaos: Cluster, workers, origin: Origin, tmp_path: Path, path: str, size: int):
    """Two workers, a and b (2 processes each), on one file: its body, the job's producer, and once both fetched
    pieces, the name of the owner's worker (the URL's task runs there), and the workers by name."""
    body = os.urandom(size)
    origin.add(path, body, etag='"k1"', rate=RATE)
    started = {w: workers.start(w, concurrency=2) for w in ("a", "b")}
    proc = start_job(chaos, tmp_path, origin.url(path))
    deadline = time.monotonic() + 60
    while len(roles := fetchers(chaos)) < 2 or "owner" not in roles.values():
        assert time.monotonic() < deadline, roles
        time.sleep(0.05)
    owner = next(w.split("@")[0] for w, role in roles.items() if role == "owner")
    return body, proc, owner, started


def largest_piece(origin: Origin, path: str) -> int:
    spans = [r.headers["Range"][6:].split("-") for r in origin.requests_for(path) if "Range" in r.headers]
    return max(int(b) - int(a) + 1 for a, b in spans)


@pytest.mark.parametrize("leases", ["fast", "shipped"])
def test_a_helper_worker_killed_mid_file_loses_only_its_pieces(chaos, workers, origin, tmp_path, leases):
    chaos.env["FLEETFETCH_SHARED_VOLUME"] = "1"
    if leases == "shipped":  # a piece's claim lapses after the shipped URL lease (60 s): the owner then takes it
        for name in FAST_HEAL:
            chaos.env.pop(name)
    body, proc, owner, started = two_workers_fetching(chaos, workers, origin, tmp_path, "/k.bin", 24 << 20)
    doomed = "b" if owner == "a" else "a"
    started[doomed].kill()  # SIGKILL: its helpers (one per process) lose the pieces they were fetching
    rec = finish(proc, tmp_path)
    assert (chaos.downloads / "shared" / "k.bin").read_bytes() == body and rec["sha256"] == sha(body)
    assert f"{doomed}@" in rec["fetched_by"], rec
    # one piece again at most per connection of the killed worker (2 processes: 2 helpers)
    assert origin.sent["/k.bin"] <= len(body) + 2 * largest_piece(origin, "/k.bin") + BUFFERED, origin.sent


def test_the_owner_killed_mid_file_is_redelivered_and_resumes_the_shared_pieces(chaos, workers, origin, tmp_path):
    chaos.env["FLEETFETCH_SHARED_VOLUME"] = "1"
    body, proc, owner, started = two_workers_fetching(chaos, workers, origin, tmp_path, "/o.bin", 24 << 20)
    started[owner].kill()  # the URL's task and the helper beside it
    rec = finish(proc, tmp_path)
    assert (chaos.downloads / "shared" / "o.bin").read_bytes() == body and rec["sha256"] == sha(body)
    assert rec["redeliveries"] >= 1 and rec["resumed_bytes"] > 0, rec
    assert origin.sent["/o.bin"] <= len(body) + 2 * largest_piece(origin, "/o.bin") + BUFFERED, origin.sent


def test_a_file_changed_on_the_server_while_two_workers_fetch_it_is_never_spliced(chaos, workers, origin, tmp_path):
    chaos.env["FLEETFETCH_SHARED_VOLUME"] = "1"
    old, new = os.urandom(16 << 20), os.urandom(16 << 20)
    origin.add("/moving.bin", old, etag='"v1"', rate=RATE)
    workers.start("a", concurrency=2)
    workers.start("b", concurrency=2)
    proc = start_job(chaos, tmp_path, origin.url("/moving.bin"))
    deadline = time.monotonic() + 60
    while len([r for r in origin.requests_for("/moving.bin") if "Range" in r.headers]) < 3:
        assert time.monotonic() < deadline, "the file was never split"
        time.sleep(0.02)
    origin.add("/moving.bin", new, etag='"v2"', rate=4 * RATE)  # the helpers' next pieces see another version
    rec = finish(proc, tmp_path)
    assert (chaos.downloads / "shared" / "moving.bin").read_bytes() == new  # whole: never old pieces in a new file
    assert rec["sha256"] == sha(new) and "one stream" in rec["segments_note"], rec
    assert not list((chaos.downloads / "shared").glob(".*.part*"))


def test_with_no_helper_free_the_owner_adds_connections_and_late_helpers_end_quietly(chaos, workers, origin,
                                                                                     tmp_path):
    chaos.env["FLEETFETCH_SHARED_VOLUME"] = "1"
    body = os.urandom(12 << 20)
    origin.add("/alone.bin", body, etag='"a1"', rate=RATE)
    alone = workers.start("alone", concurrency=1)  # its one process runs the owner: the helpers wait in the queue
    rec = finish(start_job(chaos, tmp_path, origin.url("/alone.bin")), tmp_path)
    assert (chaos.downloads / "shared" / "alone.bin").read_bytes() == body and rec["sha256"] == sha(body)
    assert rec["workers"] == 1 and rec["connections"] >= 3 and origin.max_concurrent >= 3, rec
    assert rec["elapsed_s"] < len(body) / RATE / 2, rec  # not one connection for the whole file
    deadline = time.monotonic() + 30
    while alone.log_text().count("Nothing left to help with") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    log = alone.log_text()
    assert log.count("Nothing left to help with") == 3 and "Helped with" not in log, log[-2000:]  # plan gone
