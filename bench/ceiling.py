"""The cluster's ceiling: what one Redis costs per URL, so how many URLs/s it carries however many workers join.

`python -m bench.ceiling [--urls N] [--workers W] [--repeats R] [--commands]` starts one Redis (no persistence),
W README workers (`celery -A tasks worker --loglevel=INFO`, default: one per core) and an nginx origin of N small
files (1 KiB: the download itself costs next to nothing), runs the job R times and prints, per run and as the median:
URLs/s reached on this machine, Redis CPU per URL, Redis commands per URL, and the projected ceiling of one Redis
core (1 / Redis CPU per URL), and the workers' CPU per URL. `--commands`: each run's commands per URL by name
(CONFIG RESETSTAT before it, INFO commandstats after), Redis CPU split into user and system time, and the reads
Redis served per URL (its round trips: INFO stats total_reads_processed). The result goes to bench/results/ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.measure import run_measured
from bench.origins import plain_origin
from bench.run import RESULTS, machine_speed, make_files, verify
from bench.tools import README_WORKER, Cluster, compile_project

SIZE = 1 << 10


def measure(work: Path, urls: int, workers: int, repeats: int, commands: bool = False) -> list[dict]:
    files = work / "files"
    make_files(files, urls, SIZE)
    origin = plain_origin(files, work / "nginx")
    cluster = Cluster(work, "ceiling", workers, README_WORKER, "threads", 0, tuned=False)
    listing = work / "urls.txt"
    listing.write_text("".join(f"{origin.base_url}/f{i}.bin\n" for i in range(urls)))
    runs = []
    try:
        for r in range(repeats):
            out = work / "cluster-out" / f"run{r}"
            argv = [sys.executable, "-m", "producer", str(listing), "-d", str(out.relative_to(work / "cluster-out")),
                    "-q"]
            server = cluster.redis.client(0)
            server.config_resetstat()
            before = server.info("cpu") | server.info("stats")
            m = run_measured(argv, cluster.env, cluster.pids(), server)
            after = server.info("cpu") | server.info("stats")
            delta = {k: float(after[k]) - float(before[k]) for k in (
                "used_cpu_user", "used_cpu_sys", "total_reads_processed")}
            ok = m["rc"] == 0 and verify(out, urls, SIZE)
            cpu_ms = 1000 * m["cpu_redis_s"] / urls
            runs.append({"ok": ok, "seconds": m["seconds"], "urls_per_s": urls / m["seconds"],
                         "redis_cpu_ms_per_url": cpu_ms, "redis_cmds_per_url": m["redis_calls"] / urls,
                         "ceiling_urls_per_s": 1000 / cpu_ms if cpu_ms else float("inf"),
                         "worker_cpu_ms_per_url": 1000 * m["cpu_workers_s"] / urls,
                         "redis_user_ms_per_url": 1000 * delta["used_cpu_user"] / urls,
                         "redis_sys_ms_per_url": 1000 * delta["used_cpu_sys"] / urls,
                         "redis_reads_per_url": delta["total_reads_processed"] / urls,
                         "commands_per_url": per_command(server, urls)})
            print(_line(f"run {r + 1}", runs[-1]), flush=True)
            if commands:
                r = runs[-1]
                print(f"         Redis CPU user {r['redis_user_ms_per_url']:.3f}"
                      f" + system {r['redis_sys_ms_per_url']:.3f}"
                      f" ms/URL; {r['redis_reads_per_url']:.1f} reads (round trips) per URL", flush=True)
                print(_commands(r["commands_per_url"]), flush=True)
    finally:
        cluster.stop()
        origin.stop()
    return runs


def per_command(server: redis.Redis, urls: int) -> dict[str, list[float]]:
    """Commands served since the last CONFIG RESETSTAT by name (most first): [calls, µs spent] per URL; INFO and
    CONFIG left out. A script's µs include the commands it calls, which are counted under their names too."""
    stats = server.info("commandstats")
    calls = {k.removeprefix("cmdstat_"): [v["calls"] / urls, v["usec"] / urls] for k, v in stats.items()
             if k not in ("cmdstat_info", "cmdstat_config")}
    return dict(sorted(calls.items(), key=lambda kv: -kv[1][0]))


def _commands(calls: dict[str, list[float]]) -> str:
    return "         " + ", ".join(f"{name} {n:.2f} ({us:.0f} µs)" for name, (n, us) in calls.items() if n >= 0.005)


def _line(label: str, r: dict) -> str:
    return (f"{label:<8} {r['urls_per_s']:>8.0f} {r['redis_cpu_ms_per_url']:>14.3f} {r['redis_cmds_per_url']:>13.1f} "
            f"{r['ceiling_urls_per_s']:>15.0f} {r['worker_cpu_ms_per_url']:>15.2f}"
            f"{'' if r['ok'] else '  FAILED (a file missing or wrong)'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--urls", type=int, default=4000, help="URLs per run (default 4000)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (one per core)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the median is reported (default 3)")
    parser.add_argument("--commands", action="store_true", help="print each run's commands per URL by name")
    args = parser.parse_args(argv)
    compile_project()
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-ceiling-"))
    work.chmod(0o755)  # nginx's worker processes run as an unprivileged user
    print(f"fleetfetch cluster ceiling: {args.urls} x 1 KiB, {args.workers} README worker(s), one Redis; "
          f"{os.cpu_count()} cores, {machine_speed()}")
    print(f"{'':<8} {'URLs/s':>8} {'Redis CPU ms/URL':>14} {'Redis cmds/URL':>13} {'ceiling URLs/s':>15} "
          f"{'worker CPU ms/URL':>15}")
    try:
        runs = measure(work, args.urls, args.workers, args.repeats, args.commands)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k not in ("ok", "commands_per_url")} | {
        "ok": all(r["ok"] for r in runs)}
    print(_line("median", median))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ceiling.json").write_text(json.dumps({
        "when": time.strftime("%Y-%m-%d %H:%M"), "urls": args.urls, "workers": args.workers, "runs": runs,
        "median": median}, indent=1))
    return 0 if median["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
