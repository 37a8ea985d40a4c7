"""The ledger's compact storage against a real Redis: state bytes, compressed blocks of URLs, packed records."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import time

import pytest
import redis

from bench.realparts.servers import RedisServer
from tasks import slot_state
from tasks.hostlimit import HostKeys, HostLimiter
from tasks.ledger import (
    BLOCK,
    CANCELLED,
    DONE,
    FAILED,
    MARK,
    PACKED,
    QUEUED,
    RETRYING,
    STARTED,
    STATES,
    JobKeys,
    Ledger,
    client_for,
    compact,
    expand,
    for_thread,
    pack,
    scripts,
    unpack,
)

pytestmark = pytest.mark.fast  # the fast tier (tests/conftest.py)

SHA = hashlib.sha256(b"x").hexdigest()


def _done(i: int, worker: str = "celery@w1", **extra: object) -> dict[str, object]:
    return {"url": f"http://127.0.0.1:9/d/f{i}.bin", "status": "done", "attempts": 1, "elapsed_s": 0.125,
            "worker": worker, "final_url": f"http://127.0.0.1:9/d/f{i}.bin", "path": f"f{i}.bin", "bytes": 10 * i,
            "sha256": SHA, "http_status": 200, "content_type": "application/pdf", **extra}


def test_a_download_record_is_packed_and_comes_back_whole():
    numbers = {"w:celery@w1": 1, "c:application/pdf": 2}
    stored = compact(_done(7), DONE, "f7.bin")
    raw = pack(stored, lambda kind, value: numbers[f"{kind}:{value}"])
    assert len(raw) == PACKED.size == 49
    back = expand(unpack(raw, {1: "celery@w1", 2: "application/pdf"}), "http://127.0.0.1:9/d/f7.bin",
                         DONE, "f7.bin")
    assert back == _done(7)
    with_more = compact(_done(7, etag='"abc"', path="sub/f7.bin"), DONE, "f7.bin")
    raw = pack(with_more, lambda kind, value: numbers[f"{kind}:{value}"])
    assert raw[:1] == MARK and len(raw) > 49  # what the packing has no place for follows as JSON
    back = unpack(raw, {1: "celery@w1", 2: "application/pdf"})
    assert back["etag"] == '"abc"' and back["path"] == "sub/f7.bin" and back["sha256"] == SHA


def test_a_failure_record_stays_json():
    failure = {"url": "http://127.0.0.1:9/x", "status": "failed", "attempts": 3, "reason": "HTTP 404",
               "worker": "celery@w1", "elapsed_s": 0.5}
    stored = compact(failure, FAILED)
    raw = pack(stored, lambda kind, value: 1)
    assert raw.startswith(b"{") and unpack(raw, {}) == stored


def test_states_blocks_and_records_hold_across_block_boundaries(redis_server):
    ledger = Ledger(redis_server.client(1), 3600)
    job = f"blocks-{time.time_ns()}"
    total = BLOCK * 2 + 500
    rows = [(i, f"http://127.0.0.1:9/d/f{i}.bin", f"f{i}.bin", None, {"subdir": "s"} if i == 1500 else {})
            for i in range(total)]
    assert ledger.create(job, {"opts": {}}, rows) == total
    assert ledger.entry(job, 1500) == ("http://127.0.0.1:9/d/f1500.bin", "f1500.bin", None, {"subdir": "s"})
    assert ledger.entry(job, total - 1)[0] == f"http://127.0.0.1:9/d/f{total - 1}.bin"
    assert ledger.entry(job, total) is None
    published = list(range(0, total, 3))
    pipe = ledger.r.pipeline(transaction=True)
    ledger.mark_queued(pipe, job, published)
    pipe.execute()
    assert [i for i, *_ in ledger.unpublished(job, total)] == [i for i in range(total) if i % 3]
    ledger.transition(job, 999, STARTED, lease=60)
    ledger.transition(job, 999, DONE, _done(999), name="f999.bin")
    ledger.transition(job, 1000, FAILED, {"url": "u", "status": "failed", "reason": "HTTP 404"}, name="f1000.bin")
    assert ledger.transition(job, 999, STARTED, lease=60) == DONE  # a final state stays
    assert ledger.states(job, 998, 1002) == [None, DONE, FAILED, None]
    assert ledger.queued(job, 5) == [0, 3, 6, 9, 12] and ledger.in_state(job, [0, 999, 1000], QUEUED) == [0]
    counts = ledger.counts(job)
    assert counts["done"] == 1 and counts["failed"] == 1 and counts["queued"] == len(published) - 1
    records = {i: (r, s) for i, r, s in ledger.records(job, total)}
    assert len(records) == total
    assert records[999] == (_done(999), DONE) and ledger.record(job, 999) == _done(999)
    assert records[1000][0]["reason"] == "HTTP 404" and records[1000][1] == FAILED
    assert records[1][0] == {"url": "http://127.0.0.1:9/d/f1.bin", "path": "f1.bin", "status": "unpublished"}
    assert ledger.cancel(job, total) == total - 2  # all but the final two
    assert ledger.state(job, 0) == CANCELLED and ledger.uncancel(job, total) == total - 2
    assert [i for i, *_ in ledger.unpublished(job, total)] == [i for i in range(total) if i not in (999, 1000)]


def test_a_finished_url_costs_about_a_hundred_bytes(redis_server):
    """The ledger's share of a job's Redis (issue 18: <= 300 B/URL at the peak, queue included): states, URLs and
    records of 20 000 done downloads, measured with MEMORY USAGE."""
    ledger = Ledger(redis_server.client(1), 3600)
    job = f"size-{time.time_ns()}"
    total = 20_000
    url = "http://files.example.test:8080/datasets/2026/part-{:07d}.bin"
    ledger.create(job, {"opts": {}}, [(i, url.format(i), f"part-{i:07d}.bin", None) for i in range(total)])
    for i in range(total):
        record = _done(i) | {"url": url.format(i), "final_url": url.format(i), "path": f"part-{i:07d}.bin",
                             "sha256": hashlib.sha256(str(i).encode()).hexdigest()}
        ledger.transition(job, i, DONE, record, name=f"part-{i:07d}.bin")
    k = JobKeys(job)
    size = {part: int(ledger.r.memory_usage(getattr(k, part), samples=0) or 0) for part in ("urls", "state", "rec")}
    assert size["state"] <= total * 2 and size["urls"] < total * 20, size  # a string grows by doubling
    assert sum(size.values()) / total < 130, size
    assert ledger.record(job, 12345)["sha256"] == hashlib.sha256(b"12345").hexdigest()


def test_the_last_url_to_end_announces_the_jobs_end_to_its_followers(redis_server):
    """A follower waits on the job's `ended` channel between two looks at its counters: the script that gives
    the last URL its final state publishes there (and only that one), as does a cancel that ends the job."""
    ledger = Ledger(redis_server.client(1), 3600)
    job = f"ends-{time.time_ns()}"
    ledger.create(job, {"opts": {}}, [(i, f"http://127.0.0.1:9/e{i}", f"e{i}", None) for i in range(3)])
    with ledger.end_of(job) as end, ledger.end_of(job) as other:
        assert not end.wait(0.05) and not other.wait(0.05)  # subscribed; nothing announced
        ledger.transition(job, 0, STARTED, lease=60)
        ledger.transition(job, 0, DONE, _done(0), name="f0.bin")
        ledger.transition(job, 1, RETRYING, lease=60)
        assert not end.wait(0.3)  # two URLs have not ended
        ledger.transition(job, 1, FAILED, {"url": "http://127.0.0.1:9/e1", "status": "failed",
                                                "attempts": 3, "reason": "HTTP 404"})
        assert not end.wait(0.3)
        ledger.transition(job, 2, DONE, _done(2), name="f2.bin")
        assert end.wait(30) and other.wait(30)  # every follower hears it at once, not at its timeout
        assert not end.wait(0.3)  # once

    cancelled = f"cancels-{time.time_ns()}"
    ledger.create(cancelled, {"opts": {}}, [(i, f"http://127.0.0.1:9/c{i}", f"c{i}", None) for i in range(2)])
    with ledger.end_of(cancelled) as end:
        assert not end.wait(0.05)
        assert ledger.cancel(cancelled, 2) == 2
        assert end.wait(30)


def test_a_wait_for_the_end_with_the_server_away_just_sleeps_its_time():
    """The follower's look at the counters says that the server is away; the wait between looks neither raises
    nor retries for longer than it was given."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    ledger = Ledger(client_for(f"redis://127.0.0.1:{port}/1"), 3600)
    with ledger.end_of("nowhere") as end:
        began = time.monotonic()
        assert end.wait(0.5) is False
        assert 0.4 < time.monotonic() - began < 5  # its own time, not the client's minute of retries


def test_a_threads_own_connection_waits_without_polling_and_still_times_out(tmp_path):
    """A task thread's ledger connection is blocking in Python (no poll before each read and write: two fewer
    hand-offs of the GIL per round trip) with its timeout in the kernel, so a stalled server still fails the call
    after the timeout instead of hanging the thread."""
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        shipped = for_thread(server.url(1), 3600).r  # what a task thread gets: 30 s, in the kernel
        assert shipped.ping() and shipped.connection._sock.gettimeout() is None
        assert struct.unpack("ll", shipped.connection._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)) == (
            30, 0)
        # 1 s instead of the shipped 30, so that the stalled call below fails within this test's time
        client = client_for(server.url(1), attempts=1, own_connection=True, timeout=1)
        assert client.ping()
        sock = client.connection._sock
        assert sock.gettimeout() is None
        assert struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)) == (1, 0)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
                client.ping()
            assert time.monotonic() - began < 10  # two tries of a second each, and the backoff between them
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert client.ping()  # and it reconnects once the server answers again
    finally:
        server.stop()


def test_every_ledger_script_names_the_keys_and_arguments_it_takes(redis_server):
    """Each Lua file opens with the KEYS and ARGV it takes (the Python side passes JobKeys' named keys), and every
    one loads on a real server as the ledger sends it: with the states library in front where it needs it."""
    client = redis_server.client(1)
    for name in scripts.NAMES:
        header = [line for line in scripts.source(name).splitlines() if line.startswith("--")]
        assert any("KEYS[1]" in line for line in header), name
        sha = client.script_load(scripts.source(name))
        assert client.script_exists(sha) == [True]


def test_records_and_leases_keep_the_jobs_expiry_through_every_transition(redis_server):
    """No transition looks at a key's TTL: `rec` and `due` are written with the job's expiry at `create` and never
    empty, so a lease set after the last one ended (its set emptied meanwhile) still expires with the job."""
    ledger = Ledger(redis_server.client(1), 3600)
    job = f"expiry-{time.time_ns()}"
    ledger.create(job, {"opts": {}}, [(i, f"http://127.0.0.1:9/d/f{i}.bin", f"f{i}.bin", None) for i in range(2)])
    k = JobKeys(job)
    for i in range(2):
        ledger.transition(job, i, STARTED, lease=60)
        assert 0 < ledger.r.ttl(k.due) <= 3600 and ledger.overdue(job, 10) == []
        ledger.transition(job, i, DONE, _done(i), name=f"f{i}.bin")
        assert 0 < ledger.r.ttl(k.rec) <= 3600 and 0 < ledger.r.ttl(k.due) <= 3600
    assert ledger.release_started(job) == 0 and ledger.record(job, 1)["bytes"] == 10
    assert ledger.counts(job)["done"] == 2


def test_a_slot_and_the_started_state_are_taken_together_and_given_back_together(redis_server):
    """One script run takes a host slot and marks the URL started with its lease, or does neither (the host
    full); one gives the slot back with the final state. No moment exists where a killed worker leaves a started URL
    without its slot, or a slot held for a URL that ended."""
    ledger = Ledger(redis_server.client(1), 3600)
    limiter, host = HostLimiter(ledger.r), f"both-{time.time_ns()}.test"
    both = slot_state.SlotAndState(ledger, limiter)
    job = f"both-{time.time_ns()}"
    ledger.create(job, {"opts": {}}, [(i, f"http://127.0.0.1:9/d/f{i}.bin", f"f{i}.bin", None) for i in range(2)])
    ledger.mark_queued(ledger.r, job, [0, 1])
    k = JobKeys(job)
    first, wait, already = both.start(job, 0, 60, host, 1, 0.0, "t0", False)
    assert first is not None and wait == 0 and already is None
    assert ledger.r.zcard(HostKeys(host).slots) == 1 and ledger.state(job, 0) == STARTED
    assert ledger.r.zscore(k.due, "0") is not None
    ledger.transition_keys_args(job, 0, DONE, _done(0), None, "f0.bin")  # its worker's number known
    ledger.r.script_load(slot_state.FINISH)  # no NOSCRIPT round to count
    calls = ledger.r.info("commandstats")["cmdstat_evalsha"]["calls"]
    none, wait, _ = both.start(job, 1, 60, host, 1, 0.0, "t1", False)  # the host's one slot is taken
    assert none is None and wait > 0
    assert ledger.state(job, 1) == QUEUED and ledger.r.zscore(k.due, "1") is None  # neither changed
    assert both.finish(job, 0, DONE, _done(0), "f0.bin", first) is None
    assert ledger.r.info("commandstats")["cmdstat_evalsha"]["calls"] == calls + 2  # one script run each
    assert ledger.r.zcard(HostKeys(host).slots) == 0 and ledger.state(job, 0) == DONE
    assert ledger.r.zscore(k.due, "0") is None and ledger.record(job, 0)["bytes"] == 0
    assert both.finish(job, 0, FAILED, {"status": "failed"}, "f0.bin", first) == DONE  # kept
    second, _, _ = both.start(job, 1, 60, host, 1, 0.0, "t1", True)  # the slot free again; t1 leaves the line
    assert second is not None and ledger.state(job, 1) == STARTED
    assert ledger.r.zcard(HostKeys(host).wait) == 0


def test_a_job_whose_records_have_no_expiry_gets_the_jobs_at_the_sweep(redis_server):
    """A job an older producer created has no KEEP member: its `rec` and `due`, written by transitions that no longer
    look at TTLs, get the job's expiry from the reconciler's pass over live jobs."""
    ledger = Ledger(redis_server.client(1), 3600)
    job = f"old-{time.time_ns()}"
    ledger.create(job, {"opts": {}}, [(0, "http://127.0.0.1:9/d/f0.bin", "f0.bin", None)])
    k = JobKeys(job)
    ledger.r.delete(k.rec, k.due)  # as an older producer left them
    ledger.transition(job, 0, STARTED, lease=60)
    ledger.transition(job, 0, FAILED, {"url": "http://127.0.0.1:9/d/f0.bin", "status": "failed",
                                            "attempts": 1, "reason": "HTTP 404"})
    ledger.r.zadd(k.due, {"7": 1})
    assert ledger.r.ttl(k.rec) == -1 and ledger.r.ttl(k.due) == -1
    ledger.expire_with_job(job)
    assert 0 < ledger.r.ttl(k.rec) <= 3600 and 0 < ledger.r.ttl(k.due) <= 3600


def test_marking_a_run_of_urls_queued_reads_and_writes_its_states_once_and_started_is_derived(redis_server):
    """mark_queued reads and writes each run of consecutive indexes as one range (two commands per run, not per
    URL), leaving a URL that has a state as it is; `started` has no counter of its own (`published` less the other
    states), so a start and an end are one HINCRBY each, and every count still matches the state bytes."""
    ledger = Ledger(redis_server.client(1), 3600)
    job = f"runs-{time.time_ns()}"
    ledger.create(job, {"opts": {}}, [(i, f"http://127.0.0.1:9/d/f{i}.bin", f"f{i}.bin", None) for i in range(12)])
    ledger.transition(job, 1, STARTED, lease=60)  # taken before it was marked: it counts as published
    ledger.transition(job, 2, DONE, _done(2), name="f2.bin")
    stats = ledger.r.info("commandstats")
    before = {c: stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("getrange", "setrange", "hincrby")}
    ledger.mark_queued(ledger.r, job, [0, 1, 2, 3, 6, 7, 11])  # three runs: 0-3, 6-7, 11 (past what the string holds)
    stats = ledger.r.info("commandstats")
    assert {c: stats[f"cmdstat_{c}"]["calls"] - n for c, n in before.items()} == {
        "getrange": 3, "setrange": 3, "hincrby": 2}
    assert ledger.states(job, 0, 12) == [QUEUED, STARTED, DONE, QUEUED, None, None,
                                       QUEUED, QUEUED, None, None, None, QUEUED]
    counts = ledger.counts(job)
    assert (counts["queued"], counts["started"], counts["done"], counts["published"]) == (5, 1, 1, 7)
    hincrby = ledger.r.info("commandstats")["cmdstat_hincrby"]["calls"]
    ledger.transition(job, 0, STARTED, lease=60)
    ledger.transition(job, 0, DONE, _done(0), name="f0.bin")  # 'bytes' counted too: 0 bytes are not
    assert ledger.r.info("commandstats")["cmdstat_hincrby"]["calls"] - hincrby == 2  # n:queued -1, n:done +1
    ledger.transition(job, 3, STARTED, lease=60)
    ledger.transition(job, 3, RETRYING, lease=60)
    counts = ledger.counts(job)
    assert (counts["queued"], counts["started"], counts["retrying"], counts["done"]) == (3, 1, 1, 2)
    assert counts["published"] == sum(counts[s] for s in STATES)
    assert ledger.requeue(job, [1, 3]) == {1: 1, 3: 1}
    assert ledger.counts(job)["started"] == 0 and ledger.counts(job)["queued"] == 5
