"""Enqueueing at scale: `python -m bench.enqueue [--urls 100000 1000000 10000000]`.

For each size, `python -m producer LIST --no-wait` on a list of distinct URLs (no worker): seconds (start-up
included), URLs/s, the producer's peak PSS (its whole process tree, sampled) and Redis memory per URL afterwards
(`INFO memory` used_memory, minus before: the job's ledger and its first window of messages). A fresh Redis
without persistence per size.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench.measure import run_measured
from bench.realparts.servers import RedisServer
from bench.tools import env_for


def enqueue(work: Path, count: int) -> dict[str, float]:
    server = RedisServer(work / f"redis-{count}", appendonly=False).start()
    try:
        listing = work / "urls.txt"
        with open(listing, "w") as fh:
            for i in range(count):
                fh.write(f"http://files.example.test/datasets/2026/part-{i:08d}.bin\n")
        before = int(server.client(0).info("memory")["used_memory"])
        env = env_for(CELERY_BROKER_URL=server.url(0), CELERY_RESULT_BACKEND=server.url(1))
        res = run_measured([sys.executable, "-m", "producer", str(listing), "--no-wait", "-q"], env)
        after = int(server.client(0).info("memory")["used_memory"])
        return {"urls": count, "seconds": res["seconds"], "urls_per_s": count / res["seconds"],
                "producer_pss_mb": res["pss"] / 1e6, "redis_bytes_per_url": (after - before) / count}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.enqueue", description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-enqueue-"))
    try:
        print(f"{'URLs':>10} {'seconds':>8} {'URLs/s':>8} {'producer PSS MB':>15} {'Redis B/URL':>11}")
        for count in args.urls:
            r = enqueue(work, count)
            print(f"{r['urls']:>10} {r['seconds']:8.1f} {r['urls_per_s']:8.0f} {r['producer_pss_mb']:15.0f} "
                  f"{r['redis_bytes_per_url']:11.0f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
