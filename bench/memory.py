"""Redis memory per URL over a whole job, and bytes per task message (issue 18).

    python -m bench.memory --urls 100000              # enqueue only: queue + ledger, no worker
    python -m bench.memory --urls 20000 --run         # the whole job: workers drain it, memory sampled throughout

One Redis server (no persistence) holds the broker (db 0) and the backend (db 1), so `INFO memory` used_memory is
everything the job costs: messages, ledger (urls, state, records, counters) and Celery's results. The figure per
URL is (highest used_memory seen - used_memory before the job) / URLs. The URLs are served by nginx on 127.0.0.1
(any path: a 16-byte body), so records are those of done downloads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis

from bench.origins import Nginx
from bench.realparts.servers import RedisServer, Worker
from bench.tools import ROOT, env_for
from tasks import ledger

RESULTS = ROOT / "bench" / "results"
# Every path answers the same 16 bytes: a million URLs without a million files.
ANY_PATH = 'location / { default_type application/octet-stream; return 200 "0123456789abcdef"; }'


class Sampler(threading.Thread):
    """used_memory of the server every `every` seconds; the highest seen."""

    def __init__(self, client: redis.Redis, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.client, self.every, self.peak = client, every, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, used(self.client))
            self.stopped.wait(self.every)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return max(self.peak, used(self.client))


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def key_sizes(broker: redis.Redis, backend: redis.Redis, job: str) -> dict[str, int]:
    """MEMORY USAGE of the job's keys and the queue (sampled: SAMPLES 0 reads every element)."""
    out = {"queue": int(broker.memory_usage("fleetfetch", samples=0) or 0)}
    for part in ("meta", "urls", "state", "rec", "names", "due"):
        out[part] = int(backend.memory_usage(f"ff:{{{job}}}:{part}", samples=0) or 0)
    return out


def results_bytes(backend: redis.Redis) -> tuple[int, int]:
    """(Celery result keys, their MEMORY USAGE summed)."""
    n = size = 0
    for key in backend.scan_iter("celery-task-meta-*", count=1000):
        n += 1
        size += int(backend.memory_usage(key) or 0)
    return n, size


def measure(work: Path, urls: int, run: bool, workers: int, concurrency: int) -> dict[str, Any]:
    server = RedisServer(work / "redis", appendonly=False).start()
    origin = Nginx(None, work / "nginx", site=ANY_PATH)
    procs: list[Worker] = []
    try:
        broker, backend = server.client(0), server.client(1)
        listing = work / "urls.txt"
        with open(listing, "w") as fh:
            for i in range(urls):
                fh.write(f"{origin.base_url}/datasets/2026/part-{i:07d}.bin\n")
        env = env_for(CELERY_BROKER_URL=server.url(0), CELERY_RESULT_BACKEND=server.url(1),
                      FLEETFETCH_DIR=str(work / "out"), FLEETFETCH_NO_FSYNC="1")
        before = used(broker)
        sampler = Sampler(broker)
        sampler.start()
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "producer", str(listing), "--no-wait", "-q"], env=env, check=True,
                       cwd=ROOT)
        enqueue_s = time.monotonic() - t0
        job = backend.zrange("ff:jobs", 0, 0)[0].decode()
        message = broker.lindex("fleetfetch", 0) or b""
        enqueued = {"used_bytes_per_url": (used(broker) - before) / urls, "message_bytes": len(message),
                    "keys": key_sizes(broker, backend, job)}
        out: dict[str, Any] = {"urls": urls, "enqueue_s": round(enqueue_s, 1), "enqueued": enqueued,
                               "message": json.loads(message) if message else None}
        if run:
            for i in range(workers):
                procs.append(Worker(env, name=f"m{i}", concurrency=concurrency, pool="threads",
                                    log=work / f"w{i}.log").start())
            while True:
                meta = backend.hmget(f"ff:{{{job}}}:meta", ["n:done", "n:failed", "n:unchanged", "n:cancelled"])
                if sum(int(v or 0) for v in meta) >= urls:
                    break
                time.sleep(0.5)
            out["run_s"] = round(time.monotonic() - t0, 1)
            n_results, results_size = results_bytes(backend)
            out["finished"] = {"used_bytes_per_url": (used(broker) - before) / urls, "keys": key_sizes(
                broker, backend, job), "celery_results": n_results, "celery_results_bytes": results_size,
                "record": ledger.Ledger(backend, 3600).record(job, 0)}
        peak = sampler.stop()
        out["peak_bytes_per_url"] = (peak - before) / urls
        out["used_memory_peak_bytes_per_url"] = (int(broker.info("memory")["used_memory_peak"]) - before) / urls
        return out
    finally:
        for w in procs:
            w.stop()
        origin.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=100_000)
    parser.add_argument("--run", action="store_true", help="run the job to its end with workers (memory sampled)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-memory-"))
    try:
        res = measure(work, args.urls, args.run, args.workers, args.concurrency)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    e = res["enqueued"]
    print(f"{res['urls']} URLs enqueued in {res['enqueue_s']} s: message {e['message_bytes']} B, "
          f"{e['used_bytes_per_url']:.0f} B/URL in Redis; keys (B/URL): "
          + ", ".join(f"{k} {v / res['urls']:.0f}" for k, v in e["keys"].items()))
    if "finished" in res:
        f = res["finished"]
        print(f"job finished in {res['run_s']} s: {f['used_bytes_per_url']:.0f} B/URL in Redis; keys (B/URL): "
              + ", ".join(f"{k} {v / res['urls']:.0f}" for k, v in f["keys"].items())
              + f"; Celery results {f['celery_results']} ({f['celery_results_bytes'] / res['urls']:.0f} B/URL)")
        print(f"record: {json.dumps(f['record'])}")
    print(f"peak over the job: {res['peak_bytes_per_url']:.0f} B/URL (used_memory sampled every 0.2 s; "
          f"used_memory_peak: {res['used_memory_peak_bytes_per_url']:.0f})")
    print(f"message: {json.dumps(res['message'])}")
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
