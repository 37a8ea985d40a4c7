"""Celery's own cost per task on this machine: the floor under fleetfetch's cost per URL.

    python -m bench.floor              # 2000 tasks that do nothing, then 2000 x 16 KiB downloads, one worker each
    python -m bench.floor -n 5000

Both runs use one `celery -A ... worker --loglevel=INFO` with no flags (the README's cluster section) on the same
app settings: threads pool, acks_late, prefetch 1 per thread, no results, Redis broker. The empty task
(`fleetfetch.bench.nothing`, registered by this module only) still goes through everything Celery does per
message: publish, BRPOP, QoS bookkeeping, the pool, the trace, the ack. What the worker spends beyond it per URL
is fleetfetch's own (slot, ledger, HTTP, file, hash). Prints CPU ms per task of the worker and of Redis, and the
throughput two cores could reach at that cost.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.measure import redis_counters, run_measured, tree_cpu
from bench.origins import plain_origin
from bench.realparts.servers import RedisServer, Worker
from bench.run import make_files, verify
from bench.tools import README_WORKER, default_env
from tasks.app import app

NOTHING = "fleetfetch.bench.nothing"


@app.task(name=NOTHING)
def nothing() -> None:
    """The empty task: what a message costs Celery alone."""


def _empty_tasks(redis: RedisServer, env: dict[str, str], work: Path, count: int) -> dict[str, float]:
    worker = Worker(env, name="floor", log=work / "floor.log", concurrency=None, pool=None)
    worker.argv = [sys.executable, "-m", "celery", "-A", "bench.floor", "worker", "--loglevel=INFO"]
    with worker:
        client = redis.client(0)
        cpu0, (cmds0, redis0) = tree_cpu([worker.pid]), redis_counters(client)
        start = time.monotonic()
        with app.connection_for_write(redis.url(0)) as conn:  # this process read no CELERY_BROKER_URL
            for _ in range(count):
                nothing.apply_async(connection=conn)
        while client.llen("fleetfetch") or client.hlen("unacked"):  # queued or delivered and not yet acknowledged
            time.sleep(0.05)
        seconds = time.monotonic() - start
        cmds, redis_cpu = redis_counters(client)
        return {"seconds": seconds, "worker_cpu_s": tree_cpu([worker.pid]) - cpu0, "redis_cpu_s": redis_cpu - redis0,
                "cmds": cmds - cmds0}


def _downloads(redis: RedisServer, env: dict[str, str], work: Path, count: int) -> dict[str, float]:
    make_files(work / "site", count, 16 << 10)
    origin = plain_origin(work / "site", work / "nginx")
    listing = work / "urls.txt"
    listing.write_text("".join(f"{origin.base_url}/f{i}.bin\n" for i in range(count)))
    worker = Worker(env, name="fetch", log=work / "fetch.log", concurrency=None, pool=None)
    worker.argv = [sys.executable, *README_WORKER]
    try:
        with worker:
            cpu0, (cmds0, _) = tree_cpu([worker.pid]), redis_counters(redis.client(0))
            (work / "out" / "job").mkdir(parents=True)
            res = run_measured([sys.executable, "-m", "producer", str(listing), "-d", "job", "-q"], env, [worker.pid],
                               redis.client(0))
            if res["rc"] != 0 or not verify(work / "out" / "job", count, 16 << 10):
                raise SystemExit(f"bench.floor: the download job failed: {res['stderr'][-300:]}")
            cmds, _ = redis_counters(redis.client(0))
            return {"seconds": res["seconds"], "worker_cpu_s": tree_cpu([worker.pid]) - cpu0,
                    "redis_cpu_s": res["cpu_redis_s"], "cmds": cmds - cmds0}
    finally:
        origin.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="tasks (and URLs) per run")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-floor-"))
    work.chmod(0o755)
    redis = RedisServer(work / "redis", appendonly=False).start()
    env = default_env(CELERY_BROKER_URL=redis.url(0), CELERY_RESULT_BACKEND=redis.url(1),
                      FLEETFETCH_DIR=str(work / "out"), PYTHONPATH=os.getcwd())
    try:
        rows = [("Celery alone: an empty task", _empty_tasks(redis, env, work, args.n)),
                ("fleetfetch: a 16 KiB download", _downloads(redis, env, work, args.n))]
    finally:
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    cores = psutil.cpu_count() or 1
    print(f"{args.n} tasks each, one worker with no flags (threads c=32), {cores} cores; CPU ms per task:")
    for name, r in rows:
        per = 1000 / args.n
        worker_ms, redis_ms = r["worker_cpu_s"] * per, r["redis_cpu_s"] * per
        print(f"  {name:32s} worker {worker_ms:5.2f}  Redis {redis_ms:4.2f}  commands {r['cmds'] / args.n:5.1f}  "
              f"{r['seconds']:6.2f} s  (at most {cores * 1000 / (worker_ms + redis_ms):5.0f} tasks/s on {cores} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
