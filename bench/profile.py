"""Where one worker's time goes: a job against one `celery -A tasks worker`, with its CPU split and Redis commands.

    python -m bench.profile remote                                   # worker with no flags, default settings
    python -m bench.profile small -- -P prefork -c 2 FLEETFETCH_PER_HOST=0
    python -m bench.profile remote --py-spy /tmp/prof.txt            # also py-spy record --gil (pip install py-spy)
    python -m bench.profile remote --perf /tmp/perf.data             # also perf record: where the CPU goes, kernel too

Workloads: `remote` (1000 x 64 KiB, 50 ms to first byte, 1 MB/s per connection), `small` (2000 x 16 KiB) and
`big` (1 x 1 GiB).
Prints seconds, worker PSS, CPU ms per URL (producer, worker user/system, Redis) and Redis commands per URL by
command (INFO commandstats; commands run inside Lua scripts count too).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.measure import run_measured
from bench.origins import Nginx, PythonOrigin, plain_origin
from bench.realparts.servers import RedisServer, Worker
from bench.run import REMOTE_DELAY, REMOTE_RATE, make_files, verify
from bench.tools import default_env

WORKLOADS = {"remote": (1000, 64 << 10, True), "small": (2000, 16 << 10, False), "big": (1, 1 << 30, False)}
# Where a worker holds the GIL, by the first of these frames found in a sample's stack.
CATEGORIES = [("Celery consumer: receive, QoS, ack (main thread)", ("asynloop",)),
              ("Celery result: store SUCCESS (GET + SETEX + PUBLISH)", ("Backend.store_result",)),
              ("fleetfetch ledger transitions", ("Call.mark",)),
              ("fleetfetch host slot", ("_take_slot", "HostLimiter.release")),
              ("HTTP request and body (requests/urllib3)", ("open_response", "_stream (")),
              ("files: temp file, fsync, rename, validators", ("_commit (", "PartFile", "_validators")),
              ("logging", ("Logger.",))]


def categorise(raw: Path) -> list[tuple[str, float]]:
    """Shares of py-spy's raw (collapsed) samples per category; the rest is Celery's trace and pool glue."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        name = next((c for c, keys in CATEGORIES if any(k in stack for k in keys)), "other: Celery trace, pool glue")
        counts[name] += int(n)
    return [(name, n / total) for name, n in counts.most_common()] if total else []


# Where a worker's CPU goes by perf's samples (the kernel included): the first matching frame of each stack.
PERF_CATEGORIES = [("kernel: futex (threads waking each other: mostly the GIL changing hands)", ("__x64_sys_futex",)),
                   ("kernel: fsync", ("__x64_sys_fsync",)),
                   ("kernel: other system calls and interrupts", ("[kernel.kallsyms]",)),
                   ("Python (user space)", ("",))]


def perf_shares(data: Path) -> list[tuple[str, float]]:
    """Shares of perf's samples (`perf script` of `data`) per PERF_CATEGORIES."""
    text = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True, check=True).stdout
    counts: collections.Counter[str] = collections.Counter()
    for sample in text.split("\n\n"):
        frames = sample.strip().splitlines()[1:]
        if frames:
            stack = "\n".join(frames)
            counts[next(c for c, keys in PERF_CATEGORIES if any(k in stack for k in keys))] += 1
    total = sum(counts.values())
    return [(name, counts[name] / total) for name, _ in PERF_CATEGORIES] if total else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--py-spy", type=Path, help="write py-spy's raw --gil samples of the worker here")
    parser.add_argument("--perf", type=Path, help="write `perf record -g` samples of the worker here (Linux perf)")
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser.epilog = "after --: worker flags (-P prefork -c 2) and VAR=value settings (FLEETFETCH_PER_HOST=0)"
    args = parser.parse_args(ours)
    flags = [a for a in extra if "=" not in a or a.startswith("-")]
    settings = dict(a.split("=", 1) for a in extra if "=" in a and not a.startswith("-"))
    count, size, remote = WORKLOADS[args.workload]
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-profile-"))
    work.chmod(0o755)
    make_files(work / "site", count, size)
    origin: Nginx | PythonOrigin = (PythonOrigin(work / "site", REMOTE_DELAY, REMOTE_RATE) if remote
                                    else plain_origin(work / "site", work / "nginx"))
    listing = work / "urls.txt"
    listing.write_text("".join(f"{origin.base_url}/f{i}.bin\n" for i in range(count)))
    redis = RedisServer(work / "redis", appendonly=False).start()
    env = default_env(CELERY_BROKER_URL=redis.url(0), CELERY_RESULT_BACKEND=redis.url(1),
                      FLEETFETCH_DIR=str(work / "out"), **settings)
    worker = Worker(env, name="profile", log=work / "worker.log")
    worker.argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO", *flags]
    samplers: list[subprocess.Popen] = []
    try:
        worker.start()
        if args.py_spy:
            samplers.append(subprocess.Popen(["py-spy", "record", "-p", str(worker.pid), "--subprocesses", "--gil",
                                              "-r", "200", "-f", "raw", "-o", str(args.py_spy), "--nonblocking"],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if args.perf:
            samplers.append(subprocess.Popen(["perf", "record", "-g", "-p", str(worker.pid), "-o", str(args.perf)],
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if samplers:
            time.sleep(1)
        before = psutil.Process(worker.pid).cpu_times()
        stats_before = redis.client(0).info("commandstats")
        (work / "out" / "job").mkdir(parents=True)
        res = run_measured([sys.executable, "-m", "producer", str(listing), "-d", "job", "-q"], env, [worker.pid],
                           redis.client(0))
        after = psutil.Process(worker.pid).cpu_times()
        stats = redis.client(0).info("commandstats")
        ok = res["rc"] == 0 and verify(work / "out" / "job", count, size)
    finally:
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(60)
        worker.stop()
        redis.stop()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.workload} ({count} x {size >> 10} KiB), worker {' '.join(flags) or '(no flags)'} {settings or ''}: "
          f"{res['seconds']:.2f} s, {'verified' if ok else 'FAILED ' + res['stderr'][-300:]}, "
          f"worker PSS {res['worker_pss'] / 1e6:.0f} MB")
    per = 1000 / count
    print(f"CPU ms per URL: producer {res['cpu_tool_s'] * per:.1f}, worker user {(after.user - before.user) * per:.1f} "
          f"+ system {(after.system - before.system) * per:.1f} (tree {res['cpu_workers_s'] * per:.1f}), "
          f"Redis {res['cpu_redis_s'] * per:.1f}")
    calls = {k.removeprefix("cmdstat_"): v["calls"] - stats_before.get(k, {"calls": 0})["calls"]
             for k, v in stats.items() if k != "cmdstat_info"}
    top = sorted(((n, k) for k, n in calls.items() if n), reverse=True)
    print(f"Redis commands per URL: {sum(calls.values()) / count:.1f} = "
          + ", ".join(f"{k} {n / count:.2f}" for n, k in top if n / count >= 0.05))
    if args.py_spy and args.py_spy.exists():
        print("worker holding the GIL (py-spy --gil):")
        for name, share in categorise(args.py_spy):
            print(f"  {share * 100:5.1f}%  {name}")
    if args.perf and args.perf.exists():
        print("worker CPU by perf's samples (kernel included):")
        for name, share in perf_shares(args.perf):
            print(f"  {share * 100:5.1f}%  {name}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
