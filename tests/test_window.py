"""A job larger than the broker's window: at most FLEETFETCH_WINDOW messages of it in Redis at once, the rest
waits in the ledger, and workers alone (the producer gone) publish it as the window drains."""

from __future__ import annotations

import json
import threading
import time

import pytest

from bench.realparts.servers import RedisServer
from tasks import feed
from tasks.config import QUEUE
from tasks.ledger import FEED_CHANNEL, QUEUED, Ledger
from tests.conftest import Cluster, job_id_of, write_list

URLS, WINDOW, THREADS = 10_000, 1000, 16  # ten windows


class BrokerWatch(threading.Thread):
    """The most messages of the job seen in the queue, and in the queue or delivered and not yet acknowledged."""

    def __init__(self, broker) -> None:
        super().__init__(daemon=True)
        self.broker, self.queue, self.held, self.stopped = broker, 0, 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            pipe = self.broker.pipeline(transaction=False)
            pipe.llen("fleetfetch")
            pipe.hlen("unacked")
            queue, unacked = pipe.execute()
            self.queue, self.held = max(self.queue, queue), max(self.held, queue + unacked)
            time.sleep(0.02)

    def stop(self) -> tuple[int, int]:
        self.stopped.set()
        self.join()
        return self.queue, self.held


@pytest.mark.timeout(360)  # 10 000 URLs through Celery: about 100 s on a 2-core machine, more when it is busy
def test_a_job_larger_than_the_window_completes_with_workers_alone_and_the_broker_stays_bounded(chaos, workers,
                                                                                                tmp_path):
    chaos.env.update(FLEETFETCH_WINDOW=str(WINDOW), FLEETFETCH_MAX_ATTEMPTS="1")
    listing = write_list(tmp_path / "urls.txt", [f"http://127.0.0.1:9/part-{i}.bin" for i in range(URLS)])
    queued = chaos.producer(str(listing), "-d", "window", "--no-wait")  # the producer is gone after this
    assert queued.returncode == 0, queued.stdout + queued.stderr
    job = job_id_of(queued.stdout)
    broker, backend = chaos.broker(), chaos.backend()
    assert broker.llen("fleetfetch") == WINDOW  # the first window; the rest waits in the ledger
    ledger = Ledger(backend, 3600)
    states = ledger.states(job, 0, URLS)
    assert states == [QUEUED] * WINDOW + [None] * (URLS - WINDOW)
    waiting = chaos.producer("status", job)
    assert f"{URLS - WINDOW} URLs wait in the ledger" in waiting.stdout and "never enqueued" not in waiting.stdout

    watch = BrokerWatch(broker)
    watch.start()
    workers.start("w1", concurrency=8, pool="threads")
    workers.start("w2", concurrency=8, pool="threads")
    deadline = time.monotonic() + 600
    while int(backend.hget(f"ff:{{{job}}}:meta", "n:failed") or 0) < URLS and time.monotonic() < deadline:
        time.sleep(0.5)
    queue, held = watch.stop()
    assert 0 < queue <= WINDOW
    # A URL is final in the ledger just before its message is acknowledged (acks_late): at most one such message
    # per thread (2 workers x 8) can be counted with a full window.
    assert held <= WINDOW + THREADS

    status = chaos.producer("status", job)
    assert status.returncode == 1  # every URL failed (connection refused), each exactly once
    assert f"failed {URLS}" in status.stdout and "done 0" in status.stdout and "queued 0" in status.stdout
    assert "wait in the ledger" not in status.stdout and "never enqueued" not in status.stdout
    records = [json.loads(line) for line in chaos.producer("results", job).stdout.splitlines()]
    assert [r["index"] for r in records] == list(range(URLS))
    assert all(r["status"] == "failed" and "connection refused" in r["reason"] for r in records)
    assert records[7]["url"] == "http://127.0.0.1:9/part-7.bin" and records[7]["attempts"] == 1
    resumed = chaos.producer("resume", job, "--no-wait")
    assert resumed.returncode == 0 and "published 0 URLs" in resumed.stdout
    assert broker.llen("fleetfetch") == 0


@pytest.mark.timeout(180)
def test_a_final_state_wakes_the_feeders_so_a_window_of_one_does_not_wait_a_tick_per_url(chaos, workers, tmp_path):
    """With a window of 1 the workers alone publish each URL after the one before ends: its final state announces
    the job on FEED_CHANNEL and a worker's feeder publishes the next at once, not at its next tick."""
    urls = 30
    chaos.env.update(FLEETFETCH_WINDOW="1", FLEETFETCH_MAX_ATTEMPTS="1")
    listing = write_list(tmp_path / "urls.txt", [f"http://127.0.0.1:9/one-{i}.bin" for i in range(urls)])
    queued = chaos.producer(str(listing), "-d", "one", "--no-wait")  # publishes the first URL and leaves
    assert queued.returncode == 0, queued.stdout + queued.stderr
    job = job_id_of(queued.stdout)
    backend = chaos.backend()
    wakes = backend.pubsub(ignore_subscribe_messages=True)
    wakes.subscribe(FEED_CHANNEL)
    meta = f"ff:{{{job}}}:meta"
    workers.start("w1", concurrency=4, pool="threads")
    first = None
    deadline = time.monotonic() + 150
    while int(backend.hget(meta, "n:failed") or 0) < urls and time.monotonic() < deadline:
        if first is None and int(backend.hget(meta, "n:failed") or 0) >= 1:
            first = time.monotonic()
        time.sleep(0.05)
    assert int(backend.hget(meta, "n:failed") or 0) == urls
    assert first is not None
    # Fed by the feeders' ticks alone, the other 29 URLs would take 29 ticks.
    assert time.monotonic() - first < (urls - 1) * feed.FEED_TICK / 2
    announced, until = [], time.monotonic() + 1  # get_message answers None for the subscription's own reply too
    while time.monotonic() < until:
        if (message := wakes.get_message(timeout=0.1)) is not None:
            announced.append(message["data"].decode())
    wakes.close()
    assert announced == [job] * (urls - 1)  # each URL's end but the last's (then nothing waits in the ledger)


def test_a_jobs_messages_reach_the_broker_in_batches_not_one_round_trip_each(tmp_path):
    """The producer's messages go to Redis in pipelined batches (`feed.publish`) with the shipped settings, whose
    connections retry on a timeout: kombu batches nothing on such a connection, so the producer's does not retry
    (`producer.connect._configure`). Counted with the reads the server serves, on a server of this test's own (no
    worker: every message stays in the queue)."""
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        watch = server.client(0)
        listing = write_list(tmp_path / "urls.txt", [f"http://127.0.0.1:9/batch/f{i}.bin" for i in range(1000)])
        cluster = Cluster(server, tmp_path / "downloads")
        reads = watch.info("stats")["total_reads_processed"]
        result = cluster.producer(str(listing), "--no-wait", "-q")
        served = watch.info("stats")["total_reads_processed"] - reads - 1  # less this INFO's own read
        assert result.returncode == 0, result.stderr
        assert watch.llen(QUEUE) == 1000
        assert served < 200  # a round trip per message would be over 1000
    finally:
        server.stop()
