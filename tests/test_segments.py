"""Big files in several ranges at once (--split), through real workers and a rate-limited origin on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from bench.realparts.origin import Origin
from tests.conftest import Cluster, read_manifest, write_list

RATE = 1_000_000  # bytes/s per connection at the origin: one stream is slow, as behind a CDN's per-connection cap
SPLIT = ("--split", "4", "--min-split-size", "1M")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(cluster: Cluster, tmp_path: Path, urls: list[str], *args: str) -> tuple[int, list[dict], str]:
    manifest = tmp_path / "m.jsonl"
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", urls)), "--manifest", str(manifest), *args)
    return result.returncode, read_manifest(manifest) if manifest.exists() else [], result.stdout + result.stderr


def ranges_asked(origin: Origin, path: str) -> list[dict[str, str]]:
    return [r.headers for r in origin.requests_for(path) if "Range" in r.headers]


def test_a_big_slow_file_is_fetched_as_ranges_on_several_connections_and_verified(cluster, worker, origin, tmp_path):
    body = os.urandom(8 << 20)
    origin.add("/big.bin", body, etag='"b1"', rate=RATE)
    code, records, out = run(cluster, tmp_path, [f"{origin.url('/big.bin')} sha256={sha(body)}"], "-d", "seg", *SPLIT)
    assert code == 0, out
    assert (cluster.downloads / "seg" / "big.bin").read_bytes() == body
    rec = records[0]
    assert rec["status"] == "done" and rec["sha256"] == sha(body) and rec["bytes"] == len(body)
    assert rec["connections"] == 4 and rec["segments"] >= 4, rec
    asked = ranges_asked(origin, "/big.bin")
    assert len(asked) >= 3 and all(h["If-Range"] == '"b1"' for h in asked)
    assert origin.max_concurrent >= 3
    assert origin.sent["/big.bin"] <= len(body) + (1 << 20)  # the first stream stopped where the ranges begin
    assert rec["elapsed_s"] < len(body) / RATE / 2  # faster than one stream by far
    assert not list((cluster.downloads / "seg").glob(".*.part"))


def test_a_small_or_fast_file_stays_one_stream(cluster, worker, origin, tmp_path):
    origin.add("/small.bin", os.urandom(600_000), etag='"s1"', rate=RATE)
    origin.add("/fast.bin", os.urandom(6 << 20), etag='"f1"')
    code, records, out = run(cluster, tmp_path, [origin.url("/small.bin"), origin.url("/fast.bin")], "-d", "one",
                             *SPLIT)
    assert code == 0, out
    assert not ranges_asked(origin, "/small.bin") and not ranges_asked(origin, "/fast.bin")
    assert all(r.get("connections", 1) == 1 for r in records), records


def test_a_file_changed_on_the_server_mid_download_is_never_spliced(cluster, worker, origin, tmp_path):
    old, new = os.urandom(6 << 20), os.urandom(6 << 20)
    origin.add("/moving.bin", old, etag='"v1"', rate=RATE)
    proc = cluster.producer_async(str(write_list(tmp_path / "urls.txt", [origin.url("/moving.bin")])), "-d", "moving",
                                  "--manifest", str(tmp_path / "m.jsonl"), *SPLIT)
    deadline = time.monotonic() + 30
    while not origin.requests_for("/moving.bin") and time.monotonic() < deadline:
        time.sleep(0.01)
    origin.add("/moving.bin", new, etag='"v2"', rate=RATE)  # before the ranges are asked for (the first stream probes)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    got = (cluster.downloads / "moving" / "moving.bin").read_bytes()
    assert got == new  # the new version, whole: never the first stream's bytes with the new file's ranges
    rec = read_manifest(tmp_path / "m.jsonl")[0]
    assert rec["sha256"] == sha(new) and "one stream" in rec["segments_note"], rec


def test_a_server_that_ignores_range_gets_one_stream_and_a_correct_file(cluster, worker, origin, tmp_path):
    body = os.urandom(4 << 20)
    origin.add("/ignores.bin", body, etag='"i1"', rate=RATE, ignore_range=True)
    code, records, out = run(cluster, tmp_path, [origin.url("/ignores.bin")], "-d", "ignores", *SPLIT)
    assert code == 0, out
    assert (cluster.downloads / "ignores" / "ignores.bin").read_bytes() == body
    rec = records[0]
    assert rec["sha256"] == sha(body) and rec["connections"] == 1 and "200 to a range" in rec["segments_note"], rec


def test_a_lying_content_range_is_never_spliced(cluster, worker, origin, tmp_path):
    body = os.urandom(4 << 20)
    origin.add("/liar.bin", body, etag='"l1"', rate=RATE, lying_range=True)
    code, records, out = run(cluster, tmp_path, [origin.url("/liar.bin")], "-d", "liar", *SPLIT)
    assert code == 0, out
    assert (cluster.downloads / "liar" / "liar.bin").read_bytes() == body
    rec = records[0]
    assert rec["sha256"] == sha(body) and rec["connections"] == 1 and "Content-Range" in rec["segments_note"], rec


def test_per_host_2_with_split_8_never_opens_more_than_2_connections(cluster, worker, origin, tmp_path):
    bodies = {f"/p{i}.bin": os.urandom(3 << 20) for i in range(2)}
    for path, body in bodies.items():
        origin.add(path, body, etag=f'"{path}"', rate=RATE)
    code, records, out = run(cluster, tmp_path, [origin.url(p) for p in bodies], "-d", "polite", "--per-host", "2",
                             "--split", "8", "--min-split-size", "1M")
    assert code == 0, out
    for path, body in bodies.items():
        assert (cluster.downloads / "polite" / path.lstrip("/")).read_bytes() == body
    assert origin.max_concurrent <= 2
    alone = [tmp_path / "alone"]
    code, records, out = run(cluster, alone[0].parent, [origin.url("/p0.bin")], "-d", "polite1", "--per-host", "2",
                             "--split", "8", "--min-split-size", "1M")
    assert code == 0, out
    assert records[0]["connections"] == 2 and origin.max_concurrent <= 2, records


def test_a_worker_killed_mid_file_fetches_only_the_missing_ranges(chaos, workers, origin, tmp_path):
    body = os.urandom(16 << 20)
    origin.add("/killed.bin", body, etag='"k1"', rate=RATE)
    doomed = workers.start("doomed", concurrency=1)
    manifest = tmp_path / "m.jsonl"
    proc = chaos.producer_async(str(write_list(tmp_path / "urls.txt", [origin.url("/killed.bin")])), "-d", "killed",
                                "--manifest", str(manifest), *SPLIT)
    try:
        deadline = time.monotonic() + 60
        while origin.sent.get("/killed.bin", 0) < len(body) // 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(ranges_asked(origin, "/killed.bin")) >= 3, "the file was never split"
        doomed.kill()  # SIGKILL to its whole process group: no attempt gets to save anything on the way out
        workers.start("survivor", concurrency=1)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert (chaos.downloads / "killed" / "killed.bin").read_bytes() == body
    rec = read_manifest(manifest)[0]
    assert rec["sha256"] == sha(body) and rec["resumed_bytes"] > 0, rec
    assert origin.sent["/killed.bin"] <= len(body) + len(body) // 4, origin.sent  # at most one segment again


def test_pieces_cover_the_missing_ranges_exactly_in_bounded_sizes():
    from tasks.segments import MIN_PIECE, PIECE, _Map, plan

    kept = _Map("u", 50 << 20, '"v"', [[0, 3 << 20], [10 << 20, 12 << 20]])
    missing = kept.missing()
    assert missing == [(3 << 20, 10 << 20), (12 << 20, 50 << 20)]
    for count in (1, 2, 8, 16):
        pieces = plan(missing, count)
        covered = sorted((p.start, p.end) for p in pieces)
        assert sum(b - a for a, b in covered) == sum(b - a for a, b in missing)
        assert all(MIN_PIECE // 2 <= b - a <= PIECE for a, b in covered[:-1])
        assert all(any(s <= a and b <= e for s, e in missing) for a, b in covered)  # never a kept byte again


def test_a_503_on_a_range_pauses_the_host_and_the_retry_fetches_only_missing_ranges(cluster, worker, origin,
                                                                                     tmp_path):
    body = os.urandom(8 << 20)
    origin.add("/shed.bin", body, etag='"s1"', rate=RATE, busy_ranges=1)
    code, records, out = run(cluster, tmp_path, [origin.url("/shed.bin")], "-d", "shed", *SPLIT)
    assert code == 0, out
    assert (cluster.downloads / "shed" / "shed.bin").read_bytes() == body
    rec = records[0]
    assert rec["attempts"] == 2 and rec["resumed_bytes"] > 0, rec
    seen = origin.requests_for("/shed.bin")
    refused = next(r for r in seen if "Range" in r.headers)  # the first range request got the 503
    later = [r.time - refused.time for r in seen if r.time > refused.time + 0.05]
    assert later and min(later) >= 0.95  # nobody asked the host again before its Retry-After was over
    assert origin.sent["/shed.bin"] <= len(body) + len(body) // 4


def test_limit_rate_paces_a_split_file_as_a_whole(cluster, worker, origin, tmp_path):
    body = os.urandom(6 << 20)
    origin.add("/paced.bin", body, etag='"p1"', rate=600_000)
    code, records, out = run(cluster, tmp_path, [origin.url("/paced.bin")], "-d", "paced", "--split", "8",
                             "--min-split-size", "1M", "--limit-rate", "2M")
    assert code == 0, out
    rec = records[0]
    assert rec["connections"] >= 3 and rec["sha256"] == sha(body), rec
    assert rec["elapsed_s"] >= len(body) / (2 << 20) * 0.9  # 8 connections at 600 kB/s would take half as long


def test_status_shows_a_running_big_file_with_its_bytes_size_and_rate(cluster, worker, origin, tmp_path):
    body = os.urandom(16 << 20)
    origin.add("/watched.bin", body, etag='"w1"', rate=RATE)
    result = cluster.producer(str(write_list(tmp_path / "urls.txt", [origin.url("/watched.bin")])), "-d", "watched",
                              "--split", "2", "--min-split-size", "1M", "--no-wait")
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 30
    while origin.sent.get("/watched.bin", 0) < (1 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    status = cluster.producer("status", job)
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.strip().startswith("running: watched.bin"))
    assert "of 16.8 MB (" in line and line.rstrip().endswith("/s"), status.stdout
    shown = cluster.producer("status", job, "--json")
    running = json.loads(shown.stdout)["running"]
    assert running[0]["size"] == len(body) and 0 < running[0]["bytes"] < len(body), running
    assert 0 < running[0]["rate"] < 4 * RATE, running  # two connections at RATE each
    follow = cluster.producer("resume", job)
    assert follow.returncode == 0 and (cluster.downloads / "watched" / "watched.bin").read_bytes() == body
