"""Per-host limits hold across two `celery worker` processes; a Retry-After pauses a host for all of them."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from tasks import hostlimit
from tasks.hostlimit import START, HostKeys, HostLimiter
from tasks.retry import host_pause
from tests.conftest import FAST_HEAL, ROOT, Cluster, read_manifest, write_list

LEASE_S = 3


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, list[Worker]]]:
    """Own Redis and two workers (the default threads pool, 4 threads each) that may reach 127.0.0.1 and 127.0.0.2."""
    base = tmp_path_factory.mktemp("perhost")
    server = RedisServer(base / "redis").start()
    cluster = Cluster(server, base / "downloads")
    cluster.env.update(FLEETFETCH_ALLOW_NETWORKS="127.0.0.1/32,127.0.0.2/32", FLEETFETCH_HOST_LEASE=str(LEASE_S),
                       FLEETFETCH_BACKOFF_BASE="1", FLEETFETCH_BACKOFF_CAP="2",  # a server-error pause of 1 s
                       **FAST_HEAL)
    workers: list[Worker] = []
    try:
        for n in (1, 2):
            workers.append(Worker(cluster.env, name=f"h{n}", concurrency=4, pool=None, log=base / f"w{n}.log",
                                  cwd=ROOT).start())
        yield cluster, workers
    finally:
        for w in workers:
            w.stop()
        server.stop()


def commands_total(cluster: Cluster) -> int:
    stats = cluster.backend().info("commandstats")
    return sum(v["calls"] for v in stats.values())


def run_counting(cluster: Cluster, tmp_path, lines: list[str], *args: str) -> tuple[float, float]:
    """(seconds, Redis commands per download) of one job."""
    before, started = commands_total(cluster), time.monotonic()
    result = cluster.producer(str(write_list(tmp_path / "base.txt", lines)), *args, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return time.monotonic() - started, (commands_total(cluster) - before) / len(lines)


def test_per_host_limit_holds_cluster_wide_and_hosts_progress_in_parallel(pair, tmp_path):
    cluster, workers = pair
    n, delay = 200, 0.02
    with Origin("127.0.0.1").start() as a, Origin("127.0.0.2").start() as b:
        for o in (a, b):
            for i in range(n):
                o.add(f"/f{i}", f"{o.host}-{i}".encode(), delay=delay)
        lines = [o.url(f"/f{i}") for i in range(n) for o in (a, b)]
        base_s, base_ops = run_counting(cluster, tmp_path, lines, "-d", "nolimit", "--per-host", "0")
        a.reset_stats()
        b.reset_stats()
        before = commands_total(cluster)
        started = time.monotonic()
        manifest = tmp_path / "m.jsonl"
        result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "-d", "perhost", "--per-host", "2",
                                  "--manifest", str(manifest), timeout=180)
        elapsed = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        assert a.max_concurrent <= 2 and b.max_concurrent <= 2
        assert a.max_concurrent == 2 and b.max_concurrent == 2  # the limit was reached, not just respected
        a_times = [r.time for r in a.requests]
        b_times = [r.time for r in b.requests]
        # both hosts were served side by side, not one after the other
        assert min(b_times) < max(a_times) and min(a_times) < max(b_times)
        records = read_manifest(manifest)
        assert len(records) == 2 * n and {r["status"] for r in records} == {"done"}
        assert {r["worker"] for r in records} and any(r.get("waited_s", 0) > 0 for r in records)
        per_download = (commands_total(cluster) - before) / (2 * n)
        print(f"\nno limit: {2 * n} downloads in {base_s:.1f} s, {base_ops:.1f} Redis commands per download; "
              f"per-host 2: {elapsed:.1f} s, {per_download:.1f} commands per download")
        assert per_download < 3 * base_ops  # no busy loop hammering Redis while waiting for slots


def test_a_pool_thread_waits_for_its_hosts_slot_in_place(pair, tmp_path):
    """8 threads (2 workers x 4, the default threads pool) and one slot: a thread whose turn is near waits in
    place, so no task goes back to the queue (a requeue is a publish: the queue sees only the job's own 8)."""
    cluster, _ = pair
    with Origin("127.0.0.1").start() as a:
        for i in range(8):
            a.add(f"/turn{i}", b"t" * 1000, delay=0.2)
        lines = [a.url(f"/turn{i}") for i in range(8)]
        pushes = cluster.broker().info("commandstats").get("cmdstat_lpush", {}).get("calls", 0)
        manifest = tmp_path / "m.jsonl"
        result = cluster.producer(str(write_list(tmp_path / "turns.txt", lines)), "-d", "turns", "--per-host", "1",
                                  "--manifest", str(manifest), timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert a.max_concurrent == 1 and len(a.requests) == 8
        assert cluster.broker().info("commandstats")["cmdstat_lpush"]["calls"] - pushes == 8
        waited = [r.get("waited_s", 0) for r in read_manifest(manifest)]
        assert sum(1 for w in waited if w > 0) >= 6 and max(waited) < 5


def test_a_pool_process_sends_its_task_back_to_the_queue_until_its_turn(tmp_path):
    """prefork: a process does not sit waiting for a slot; its task is requeued with a countdown."""
    with RedisServer(tmp_path / "redis") as server, Origin("127.0.0.1").start() as a:
        cluster = Cluster(server, tmp_path / "dl")
        cluster.env.update(FLEETFETCH_ALLOW_NETWORKS="127.0.0.1/32")
        for i in range(4):
            a.add(f"/p{i}", b"p" * 1000, delay=0.3)
        with Worker(cluster.env, name="pf", concurrency=2, pool="prefork", log=tmp_path / "w.log", cwd=ROOT):
            result = cluster.producer(str(write_list(tmp_path / "p.txt", [a.url(f"/p{i}") for i in range(4)])),
                                      "--per-host", "1", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert a.max_concurrent == 1 and len(a.requests) == 4
        assert server.client(0).info("commandstats")["cmdstat_lpush"]["calls"] > 4  # requeued at least once


def test_a_slow_host_never_gets_more_connections_than_its_limit(pair, tmp_path):
    """Each download takes 2 x the slot lease (a host sending 12 kB/s): the lease is renewed by a timer while the
    body trickles in, so no other worker ever takes a second slot. Renewing between 1 MiB reads let it lapse."""
    cluster, _ = pair
    with Origin("127.0.0.1").start() as a:
        for i in range(3):
            a.add(f"/trickle{i}", b"t" * 72_000, rate=12_000)  # 6 s each, LEASE_S = 3
        lines = [a.url(f"/trickle{i}") for i in range(3)]
        result = cluster.producer(str(write_list(tmp_path / "slow.txt", lines)), "-d", "slow", "--per-host", "1",
                                  timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert a.max_concurrent == 1
        assert len(a.requests) == 3


def test_a_download_longer_than_two_leases_keeps_its_hosts_only_slot(pair, tmp_path):
    """A 9 s download with a 3 s slot lease outlives the slot set's first expiry (2 leases after it was taken): the
    renewals extend the set too, so the other worker's waiting task never opens a second connection."""
    cluster, _ = pair
    with Origin("127.0.0.1").start() as a:
        for i in range(2):
            a.add(f"/long{i}", b"l" * 90_000, rate=10_000)
        lines = [a.url(f"/long{i}") for i in range(2)]
        result = cluster.producer(str(write_list(tmp_path / "long.txt", lines)), "-d", "long", "--per-host", "1",
                                  timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(a.requests) == 2
        assert a.max_concurrent == 1


def test_retry_after_pauses_the_host_for_every_worker(pair, tmp_path):
    cluster, _ = pair
    with Origin("127.0.0.1").start() as a, Origin("127.0.0.2").start() as b:
        for i in range(30):
            a.add(f"/a{i}", b"a", delay=0.05)
            b.add(f"/b{i}", b"b", delay=0.05)
        a.fail("/a0", [(429, {"Retry-After": "2"})])
        limiter = HostLimiter(cluster.backend())
        limiter.r.delete(HostKeys("127.0.0.1").stats, HostKeys("127.0.0.2").stats)
        lines = [a.url("/a0")] + [x for i in range(1, 30) for x in (a.url(f"/a{i}"), b.url(f"/b{i}"))]
        result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "-d", "pause", "--per-host", "4",
                                  timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        throttled = a.requests_for("/a0")[0].time
        # nothing reached host a during the pause, from any worker (a request already in flight may finish)
        during = [r for r in a.requests if throttled + 0.2 < r.time < throttled + 1.9]
        assert during == []
        assert any(throttled < r.time < throttled + 1.9 for r in b.requests)  # the other host kept going
        assert len(a.requests) == 31  # 30 URLs, one of them twice
        # the 429 also halved host a's window (8 -> 4) for every worker; host b's was never cut
        assert limiter.window("127.0.0.1") == START // 2 and limiter.window("127.0.0.2") == START


def test_server_errors_in_a_row_pause_the_host_for_every_worker(pair, tmp_path):
    cluster, _ = pair
    with Origin("127.0.0.1").start() as a, Origin("127.0.0.2").start() as b:
        for i in range(8):  # every URL of host a answers 500 twice: its first 5 requests are 500s in a row
            a.add(f"/a{i}", b"a", delay=0.05)
            a.fail(f"/a{i}", [500, 500])
        for i in range(80):
            b.add(f"/b{i}", b"b", delay=0.05)
        lines = [a.url(f"/a{i}") for i in range(8)] + [b.url(f"/b{i}") for i in range(80)]
        result = cluster.producer(str(write_list(tmp_path / "urls.txt", lines)), "-d", "errors", "--per-host", "4",
                                  timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        times = sorted(r.time for r in a.requests)
        fifth = times[4]  # the fifth 500 in a row: host a is paused for 1 s (FLEETFETCH_BACKOFF_BASE)
        # requests already in flight may end, but none starts during the pause, from any worker
        assert [t for t in times if fifth + 0.3 < t < fifth + 0.95] == []
        assert any(fifth < r.time < fifth + 0.95 for r in b.requests)  # the other host kept going
        assert len(a.requests) == 24  # every URL of host a: two 500s, then served (the third of 3 attempts)


def test_server_error_streak_is_counted_cluster_wide_and_ended_by_a_success(redis_server):
    limiter = HostLimiter(redis_server.client(1))
    host = "streak.test"
    assert [limiter.server_error(host) for _ in range(5)] == [1, 2, 3, 4, 5]
    limiter.pause(host, 0.5)
    assert host in limiter.paused()
    lease, _ = limiter.acquire(host, 4)
    assert lease is None  # paused: nobody gets a slot
    limiter.r.delete(HostKeys(host).pause)
    lease, _ = limiter.acquire(host, 4)
    assert lease is not None
    limiter.release(lease, answered=True)  # the host served a download: the streak is over
    assert limiter.server_error(host) == 1


def _cycle(limiter: HostLimiter, host: str, held: list, ceiling: int, times: int) -> int:
    """Serve `times` downloads with the window full: each release answered, then its slot taken again."""
    window = 0
    for _ in range(times):
        window = limiter.release(held.pop(0), answered=True)
        lease, _ = limiter.acquire(host, ceiling)
        if lease is not None:
            held.append(lease)
    return window


def _fill(limiter: HostLimiter, host: str, held: list, ceiling: int) -> int:
    """Take slots until the host's window is full; returns how many are held."""
    while (lease := limiter.acquire(host, ceiling)[0]) is not None:
        held.append(lease)
    return len(held)


@pytest.mark.fast
def test_a_hosts_window_doubles_while_it_keeps_up_then_halves_on_stress(redis_server):
    """The adaptive window's rules, run by its Lua scripts on a real Redis (the server's clock and state)."""
    limiter = HostLimiter(redis_server.client(1))
    host, ceiling = "window.test", 50
    held: list = []
    assert _fill(limiter, host, held, ceiling) == START == 8
    assert _cycle(limiter, host, held, ceiling, 7) == 8  # 7 served: not yet a window's worth
    assert _cycle(limiter, host, held, ceiling, 1) == 16  # the 8th doubles it
    assert _fill(limiter, host, held, ceiling) == 16
    assert _cycle(limiter, host, held, ceiling, 16) == 32
    assert _fill(limiter, host, held, ceiling) == 32
    assert _cycle(limiter, host, held, ceiling, 32) == ceiling  # 64, but never past the ceiling
    assert _fill(limiter, host, held, ceiling) == ceiling
    assert limiter.acquire(host, 4)[0] is None  # a job with a lower ceiling gets no more than its own
    # stress halves it, once per average download time (set long here: the downloads above took no time)
    limiter.r.hset(HostKeys(host).stats, "avg_ms", 60_000)
    assert limiter.halve(host) == 25
    assert limiter.halve(host) is None  # what was in flight when it was halved does not halve it again
    # after stress it grows by one per window served, not by doubling
    for lease in held[25:]:
        limiter.release(lease, answered=False)
    del held[25:]
    assert _fill(limiter, host, held, ceiling) == 25
    assert _cycle(limiter, host, held, ceiling, 25) == 26
    # a window not in use proves nothing: one download at a time never grows it
    while held:
        limiter.release(held.pop(), answered=False)
    for _ in range(60):
        lease, _ = limiter.acquire(host, ceiling)
        assert limiter.release(lease, answered=True) == 26
    # downloads that failed do not count
    assert _fill(limiter, host, held, ceiling) == 26
    for _ in range(30):
        limiter.release(held.pop(0), answered=False)
        held.append(limiter.acquire(host, ceiling)[0])
    assert limiter.window(host) == 26


def test_a_slot_given_back_wakes_a_waiter_of_another_worker_at_once(redis_server):
    """Tasks waiting for a host's slot are woken by a release on any worker (one token per slot freed, one per
    slot a grown window adds, never more than there are waiters), not left asleep until their next re-check."""
    mine, theirs = HostLimiter(redis_server.client(1)), HostLimiter(redis_server.client(1))  # two connections
    host, ceiling = "wake.test", 50
    held: list = []
    free, line = HostKeys(host).free, HostKeys(host).wait
    assert _fill(mine, host, held, ceiling) == START
    mine.r.delete(line)  # _fill's last try got in line: out of it
    mine.release(held.pop(0), answered=True)
    assert mine.r.llen(free) == 0  # nobody waits: no token
    assert _fill(mine, host, held, ceiling) == START
    mine.r.delete(line)
    for waiter in ("w1", "w2", "w3"):
        assert theirs.acquire(host, ceiling, waiter=waiter)[0] is None  # in line
    returned = threading.Event()
    waiting = threading.Thread(target=lambda: (theirs.wait(host, 60), returned.set()))
    waiting.start()
    time.sleep(0.3)
    assert not returned.is_set()  # nothing freed: it waits
    mine.release(held.pop(0), answered=False)  # one slot back: one waiter woken
    waiting.join(20)
    assert returned.is_set() and mine.r.llen(free) == 0  # woken by the token, which it took
    lease, _ = theirs.acquire(host, ceiling, waiter="w1")
    assert lease is not None  # and the slot is there for it
    held.append(lease)
    _cycle(mine, host, held, ceiling, START - 1)  # answered releases, the window full: the 8th of them doubles it
    assert mine.window(host) == 2 * START
    assert mine.r.llen(free) == 2  # 7 tokens for slots retaken at once, 9 for the doubling: trimmed to 2 waiters
    mine.r.delete(free)


@pytest.mark.fast
def test_a_slot_given_back_twice_counts_once(redis_server):
    """A release sent again (its reply lost with a broken connection, then sent again by the client's retries or
    by `slot_state.SlotAndState.finish`) frees no second slot and counts no second download towards the window."""
    limiter = HostLimiter(redis_server.client(1))
    host, ceiling = "twice.test", 50
    held: list = []
    assert _fill(limiter, host, held, ceiling) == START
    limiter.r.delete(HostKeys(host).wait)
    lease = held.pop(0)
    assert limiter.release(lease, answered=True) == START
    assert limiter.release(lease, answered=True) == START
    assert limiter.r.hget(HostKeys(host).stats, "ok") == b"1"  # one download served, not two
    assert limiter.r.zcard(HostKeys(host).slots) == START - 1


@pytest.mark.fast
def test_two_configurations_in_one_process_keep_their_own_per_host_limit_and_slot_lease(in_process, origin,
                                                                                        tmp_path):
    """Settings are passed in, not read at import: one process runs a worker with FLEETFETCH_PER_HOST=1 and a 5 s
    host slot lease, then one with 3 and the shipped 60 s; each holds its own limit, and its slots' leases run for
    its own lease (renewed a third of it)."""
    for i in range(6):
        origin.add(f"/f{i}", b"x" * 1000, delay=0.25)
    lines = [origin.url(f"/f{i}") for i in range(6)]
    for per_host, lease_s in ((1, 5), (3, 60)):
        origin.reset_stats()
        w = in_process(FLEETFETCH_PER_HOST=str(per_host), FLEETFETCH_HOST_LEASE=str(lease_s))
        slots = HostKeys("127.0.0.1").slots
        with w.running(concurrency=4):
            job, total = w.submit(lines, tmp_path / f"per-host-{per_host}.txt")
            left: list[float] = []
            while not left:  # how long the slots held now have left, on the server's clock (read at once)
                held, (now_s, now_us) = w.ledger.r.pipeline().zrange(slots, 0, -1, withscores=True).time().execute()
                left = [score - (now_s * 1000 + now_us // 1000) for _, score in held]
            records = w.wait(job, total)
        assert {r["status"] for r in records} == {"done"} and len(origin.requests) == 6
        assert origin.max_concurrent == per_host
        assert all(lease_s * 1000 - 3000 < ms <= lease_s * 1000 for ms in left), (lease_s, left)


@pytest.mark.fast
def test_host_pause_policy():
    policy = {"threshold": 3, "base": 0.5, "cap": 1.5, "max_wait": 10}
    # other 5xx: nothing until the threshold, then base, doubling, capped
    assert [host_pause(500, None, 1, n, **policy) for n in range(1, 7)] == [0, 0, 0.5, 1.0, 1.5, 1.5]
    assert host_pause(500, None, 1, 9, **{**policy, "threshold": 0}) == 0  # FLEETFETCH_HOST_ERRORS=0: never
    # 429/503: the server's Retry-After (at most max_wait), else this attempt's backoff step
    assert host_pause(429, 4.0, 1, 0, **policy) == 4.0
    assert host_pause(503, 60.0, 1, 0, **policy) == 10
    assert [host_pause(503, None, a, 0, **policy) for a in (1, 2, 3)] == [0.5, 1.0, 1.5]
    assert host_pause(404, None, 1, 9, **policy) == 0


def test_slots_of_a_killed_worker_come_back(pair, tmp_path):
    cluster, workers = pair
    with Origin("127.0.0.1").start() as a:
        for i in range(8):
            a.add(f"/slow{i}", b"x" * 40_000, rate=20_000)
        lines = [a.url(f"/slow{i}") for i in range(8)]
        proc = cluster.producer_async(str(write_list(tmp_path / "urls.txt", lines)), "-d", "killed", "--per-host", "2")
        deadline = time.monotonic() + 20
        while len(a.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers[0].kill()  # it may hold one or both slots; its leases expire after LEASE_S
        # A replacement comes up (as an orchestrator would restart it); the dead worker's URLs come back when their
        # leases run out (the reconciler), its host slots when theirs do.
        workers[0] = Worker(cluster.env, name="h1b", concurrency=4, pool=None, log=tmp_path / "w1b.log",
                            cwd=ROOT).start()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, out + err
        assert a.max_concurrent <= 2
        records = read_manifest_from_results(cluster, out)
        assert len(records) == 8 and all(r["status"] == "done" for r in records)


def read_manifest_from_results(cluster: Cluster, producer_output: str) -> list[dict]:
    import json

    from tests.conftest import job_id_of

    listing = cluster.producer("results", job_id_of(producer_output))
    return [json.loads(line) for line in listing.stdout.splitlines()]


@pytest.mark.fast
def test_lease_ids_are_unique_across_forked_processes():
    """A slot's lease id is a per-process prefix and a counter: a prefork child draws its own prefix, or two
    children would take the same slot under one id (one ZADD overwriting the other's lease)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: as a prefork pool process after the fork
        os.write(write, " ".join(hostlimit._lease_ids.next() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 4096).decode().split()
    os.close(read)
    mine = [hostlimit._lease_ids.next() for _ in range(3)]
    assert len(set(mine)) == 3 and len(set(child)) == 3
    assert not set(mine) & set(child) and mine[0][:16] != child[0][:16]


def test_downloads_ends_go_to_redis_with_the_workers_acks_not_one_round_trip_each(pair, tmp_path):
    """In a threads pool a download's FINISH (final state, slot given back) is sent by the worker's event loop
    with the acks of its turn, just before them (slot_state.Ends): every one of them arrives on the workers'
    `fleetfetch-ends` connections, and the job ends with every record written and no slot held."""
    cluster, _ = pair
    n = 60
    with Origin("127.0.0.1").start() as origin:
        for i in range(n):
            origin.add(f"/e{i}", b"e" * 100)
        manifest = tmp_path / "m.jsonl"
        result = cluster.producer(str(write_list(tmp_path / "e.txt", [origin.url(f"/e{i}") for i in range(n)])),
                                  "-d", "ends", "--manifest", str(manifest), timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = read_manifest(manifest)
    assert len(manifest) == n and all(r["status"] == "done" for r in manifest)
    ends = [c for c in cluster.backend().client_list() if c["name"] == "fleetfetch-ends"]
    assert 1 <= len(ends) <= 2  # one per worker that finished a download
    # Each FINISH is one command of theirs (their first is the HELLO/SETNAME of the connection).
    assert sum(int(c["tot-cmds"]) for c in ends) >= n
    assert cluster.backend().zcard(HostKeys("127.0.0.1").slots) == 0
