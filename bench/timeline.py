"""A job's timeline on the remote-like list, seen from the origin: when the first request came, how many came in
each quarter second and how many were in flight at most, when the last came, and when the command ended.

    python -m bench.timeline                                   # local mode, no options (python -m producer LIST)
    python -m bench.timeline --per-host 0 --concurrency 50     # producer options after the command
    python -m bench.timeline --workers 2                       # the README's workers, started beforehand
    python -m bench.timeline -- FLEETFETCH_NO_FSYNC=1          # settings after --
    python -m bench.timeline --runs 3

The origin (1000 x 64 KiB, 50 ms to first byte, 1 MB/s per connection, as the bench's remote-like workload) runs
in this process and stamps each request; times are seconds since the producer was started. Where a job's time
goes that the bench's totals do not show: the start (server, workers, producer), the host window's slow start,
the steady pace against curl's (50 downloads of 0.114 s at once: ~110 requests per quarter second), the stop.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from bench.run import REMOTE_DELAY, REMOTE_RATE
from bench.tools import compile_project, default_env

URLS, SIZE, QUARTER = 1000, 64 << 10, 0.25


def one_run(origin: Origin, work: Path, producer_args: list[str], env: dict[str, str], workers: int) -> str:
    """Run the job once; one line of figures and one of quarter seconds (requests begun / most in flight)."""
    origin.reset_stats()
    run_env, started = dict(env), []
    server = None
    if workers:
        server = RedisServer(work / "redis", appendonly=False).start()
        run_env.update(CELERY_BROKER_URL=server.url(0), FLEETFETCH_DIR=str(work / "out"))
        started = [Worker(run_env, name=f"w{i}", concurrency=None, pool=None, log=work / f"w{i}.log").start()
                   for i in range(workers)]
        time.sleep(1)  # the workers idle, as a cluster's do before a job comes
    listing = work / "list.txt"
    listing.write_text("".join(origin.url(f"/f{i}.bin") + "\n" for i in range(URLS)))
    where = [] if workers else ["-d", str(work / "out")]
    try:
        began = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "producer", str(listing), "-q", *where, *producer_args],
                                env=run_env, capture_output=True, text=True)
        ended = time.monotonic() - began
    finally:
        for w in started:
            w.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(work / "out", ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"the job failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    times = sorted(r.time - began for r in origin.requests)
    begun: collections.Counter[int] = collections.Counter()
    most: dict[int, int] = collections.defaultdict(int)
    for r in origin.requests:
        q = int((r.time - began) / QUARTER)
        begun[q] += 1
        most[q] = max(most[q], r.concurrent)
    quarters = " ".join(f"{q * QUARTER:.2f}:{begun[q]}/{most[q]}" for q in sorted(begun))
    return (f"{ended:.2f} s; first request at {times[0]:.2f} s, last at {times[-1]:.2f} s ({times[-1] - times[0]:.2f} "
            f"s between them), {len(times)} requests, at most {origin.max_concurrent} at once\n  {quarters}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.timeline", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=0, help="start N workers with no flags first (default: "
                        "local mode)")
    parser.add_argument("--runs", type=int, default=1)
    args, rest = parser.parse_known_args()
    settings = rest[rest.index("--") + 1:] if "--" in rest else []
    producer_args = rest[:rest.index("--")] if "--" in rest else rest
    compile_project()
    env = default_env(**dict(s.split("=", 1) for s in settings))  # the bench's: a user's, loopback allowed
    origin = Origin("127.0.0.1")
    body = os.urandom(SIZE)
    for i in range(URLS):
        origin.add(f"/f{i}.bin", body, delay=REMOTE_DELAY, rate=REMOTE_RATE)
    origin.start()
    work = Path(tempfile.mkdtemp(prefix="ff-timeline-"))
    try:
        shown = " ".join([*producer_args, *settings]) or "no options"
        print(f"{URLS} x {SIZE >> 10} KiB remote-like; "
              f"{f'{args.workers} workers started beforehand' if args.workers else 'local mode'}; {shown}")
        print("quarter seconds as start:requests begun/most in flight")
        for _ in range(args.runs):
            print(one_run(origin, work, producer_args, env, args.workers))
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
