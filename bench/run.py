"""Run every tool on every workload, verify the output, print a table, write JSON and a chart.

    python -m bench --quick     # CI smoke check, well under a minute of downloads, one repeat
    python -m bench --full      # README figures, 3 repeats, median
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Callable
from pathlib import Path

from bench.measure import run_measured
from bench.origins import Nginx, PythonOrigin, plain_origin
from bench.realparts.servers import RedisServer
from bench.tools import (
    CAP_ROWS,
    ROOT,
    SEGMENT_PEERS,
    SEGMENT_ROWS,
    SHARED_PEERS,
    SHARED_ROW,
    Toolbox,
    compile_project,
    env_for,
    manifest_of,
)
from tasks.config import Settings

RESULTS = ROOT / "bench" / "results"
REMOTE = "1000 x 64 KiB remote-like"
THROTTLED = "96 MiB at 2 MB/s per conn"  # nginx limit_rate 2m: one big file, as behind a CDN's cap
SHARED = "1 GiB at 2 MB/s/conn, shared"  # the same origin; two workers sharing the download directory
# label: (files, size, remote-like origin?)
FULL = {"2000 x 16 KiB": (2000, 16 << 10, False), "100 x 4 MiB": (100, 4 << 20, False),
        "1 x 1 GiB": (1, 1 << 30, False), REMOTE: (1000, 64 << 10, True),
        "1-URL job (200 KiB)": (1, 200 << 10, False), THROTTLED: (1, 96 << 20, False), SHARED: (1, 1 << 30, False)}
QUICK = {"200 x 16 KiB": (200, 16 << 10, False), "10 x 4 MiB": (10, 4 << 20, False),
         "1 x 64 MiB": (1, 64 << 20, False), "100 x 64 KiB remote-like": (100, 64 << 10, True),
         "1-URL job (200 KiB)": (1, 200 << 10, False)}
REMOTE_DELAY, REMOTE_RATE = 0.05, 1_000_000  # 50 ms to first byte, 1 MB/s per connection
QUICK_TOOLS = ("curl", "aria2c", "fleetfetch local, defaults", "fleetfetch 1 worker, defaults",
               "fleetfetch 1 worker threads")


def make_files(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True)
    block = os.urandom(min(size, 1 << 20))
    for i in range(count):
        with open(root / f"f{i}.bin", "wb") as fh:
            left = size
            while left:
                fh.write(block[: min(left, len(block))])
                left -= min(left, len(block))


def throttled_origin(files: Path, prefix: Path) -> Nginx | PythonOrigin:
    """nginx with a per-connection `limit_rate 2m` (the Python origin's per-connection rate without nginx)."""
    if shutil.which("nginx"):
        return Nginx(None, prefix, site=f"root {files}; limit_rate 2m;")
    return PythonOrigin(files, 0.0, 2 << 20)


def verify(out: Path, count: int, size: int) -> bool:
    files = [p for p in out.rglob("f*.bin") if p.is_file()]
    return len(files) == count and all(p.stat().st_size == size for p in files)


def run_workloads(work: Path, workloads: dict, repeats: int, chosen: Callable[[str], bool]) -> list[dict]:
    rows: list[dict] = []
    kit = Toolbox(work)
    try:
        for label, (count, size, remote) in workloads.items():
            files = work / "site" / label.replace(" ", "_").replace("(", "").replace(")", "")
            make_files(files, count, size)
            site = work / "nginx" / files.name
            origin: Nginx | PythonOrigin = (PythonOrigin(files, REMOTE_DELAY, REMOTE_RATE) if remote
                                            else throttled_origin(files, site) if label in (THROTTLED, SHARED)
                                            else plain_origin(files, site))
            listing = work / f"{files.name}.txt"
            listing.write_text("".join(f"{origin.base_url}/f{i}.bin\n" for i in range(count)))
            outputs: list[Path] = []  # runs' outputs not yet deleted (measure_cell)
            try:
                for tool, (how, build) in kit.table.items():
                    if (not chosen(tool) or (tool == "process per URL" and count > 1000)
                            or (tool in CAP_ROWS and not remote)
                            or (tool not in SHARED_PEERS if label == SHARED else tool == SHARED_ROW)
                            or (label != SHARED
                                and (tool not in SEGMENT_PEERS if label == THROTTLED else tool in SEGMENT_ROWS))):
                        continue
                    rows.append(measure_cell(work, label, tool, how, build, listing, count, size, repeats, outputs))
                    print(format_row(rows[-1]), flush=True)
                    if rows[-1].get("fetched_by"):
                        print(f"{'':<26}   pieces per worker, each run: {'; '.join(rows[-1]['fetched_by'])}",
                              flush=True)
                    kit.stop()  # a row's workers (and their Redis) do not sit idle beside the rows after it
            finally:
                origin.stop()
                for path in [files, *outputs]:
                    shutil.rmtree(path, ignore_errors=True)
    finally:
        kit.stop()
    return rows


# A run's output up to this size is deleted when its workload is over, not before the next run: ext4 (this VM's
# root file system has no journal) checks each free inode it passes while allocating one for when it was deleted
# (`recently_deleted`), so files created just after thousands were deleted cost 4-5 times the system CPU
# (2000 x 16 KiB: 0.32 against 0.07 ms per file). Each run paid for the deletion of the one before it.
KEEP_BYTES = 256 << 20


def measure_cell(work: Path, label: str, tool: str, how: str, build: Callable, listing: Path, count: int,
                 size: int, repeats: int, outputs: list[Path]) -> dict:
    """Run one tool `repeats` times; the outputs of small workloads are left in `outputs` for the caller to
    delete when the workload is over (KEEP_BYTES)."""
    runs = []
    for r in range(repeats):
        out = work / "cluster-out" / f"{abs(hash((label, tool)))}-{r}"
        out.mkdir(parents=True)
        argv, env, watch, broker = build(listing, out)
        os.sync()  # what earlier runs left for the disk is written first: no run pays for another's writeback
        res = run_measured(argv, env, watch, broker)
        res["ok"] = res["rc"] == 0 and verify(out, count, size)
        if manifest_of(out).exists():  # a run that kept its record: who fetched the pieces of a shared file
            res["fetched_by"] = [json.loads(line).get("fetched_by", "one worker")
                                 for line in manifest_of(out).read_text().splitlines()]
        runs.append(res)
        if count * size <= KEEP_BYTES:
            outputs.append(out)
        else:
            shutil.rmtree(out, ignore_errors=True)
    seconds = statistics.median(r["seconds"] for r in runs)
    calls = statistics.median(r["redis_calls"] for r in runs)
    return {"workload": label, "tool": tool, "settings": how, "ok": all(r["ok"] for r in runs), "seconds": seconds,
            "runs": [round(r["seconds"], 2) for r in runs], "files_per_s": count / seconds,
            "mb_per_s": count * size / 1e6 / seconds, "pss_mb": max(r["pss"] for r in runs) / 1e6,
            "worker_pss_mb": max(r["worker_pss"] for r in runs) / 1e6,
            "cpu_ms_per_url": statistics.median(r["cpu_s"] for r in runs) * 1000 / count,
            "redis_cmds_per_url": calls / count if calls >= 0 else None,
            "redis_cpu_ms_per_url": statistics.median(r["cpu_redis_s"] for r in runs) * 1000 / count if calls >= 0
            else None,
            "stderr": runs[-1]["stderr"] if not all(r["ok"] for r in runs) else "",
            **({"fetched_by": [" ".join(r["fetched_by"]) for r in runs]} if "fetched_by" in runs[0] else {})}


def machine_speed() -> str:
    """How fast this machine runs what fleetfetch does, now: Python code (ms for `sum(range(10**7))`) and threads
    handing work to each other (µs per round trip between two threads through a queue: two GIL hand-offs, each a
    futex wake and a context switch, as among a worker's download threads), each the best of 5. A VM's speed can
    change twofold from one hour to the next, the hand-offs more than the loop, and fleetfetch's figures, CPU-bound
    on two cores, change with it while curl's hardly do: runs are comparable where these are alike."""
    loop = min(timeit.repeat("sum(range(10**7))", number=1, repeat=5)) * 1000
    return f"Python reference loop {loop:.0f} ms, thread hand-off {min(_round_trip() for _ in range(5)):.0f} µs"


def _round_trip(n: int = 5000) -> float:
    """µs per round trip of an item between this thread and another, through two queues."""
    there, back = queue.SimpleQueue(), queue.SimpleQueue()

    def echo() -> None:
        while (item := there.get()) is not None:
            back.put(item)

    peer = threading.Thread(target=echo)
    peer.start()
    start = time.perf_counter()
    for i in range(n):
        there.put(i)
        back.get()
    elapsed = time.perf_counter() - start
    there.put(None)
    peer.join()
    return elapsed / n * 1e6


def format_row(row: dict) -> str:
    status = "" if row["ok"] else "  FAIL " + row["stderr"].strip().replace("\n", " ")[-200:]
    workers = f"{row['worker_pss_mb']:7.0f}" if row["worker_pss_mb"] else "      -"
    cmds = f"{row['redis_cmds_per_url']:6.1f}" if row.get("redis_cmds_per_url") is not None else "     -"
    return (f"{row['workload']:<26} {row['tool']:<34} {row['seconds']:8.2f} {row['files_per_s']:8.0f} "
            f"{row['mb_per_s']:7.1f} {row['pss_mb']:6.0f} {workers} {row['cpu_ms_per_url']:8.1f} {cmds}{status}")


def enqueue_benchmark(work: Path, count: int) -> dict:
    """Publishing speed: `count` URLs, no worker consuming, producer RSS sampled."""
    redis = RedisServer(work / "redis-enqueue", appendonly=False).start()
    try:
        listing = work / "enqueue.txt"
        with open(listing, "w") as fh:
            for i in range(count):
                fh.write(f"http://127.0.0.1:9/dir/file-{i}.bin\n")
        env = env_for(CELERY_BROKER_URL=redis.url(0), CELERY_RESULT_BACKEND=redis.url(1))
        res = run_measured([sys.executable, "-m", "producer", str(listing), "--no-wait", "-q"], env)
        queued = redis.client(0).llen("fleetfetch")
        published = min(count, Settings().window)  # the rest waits in the ledger for the workers to publish it
        return {"urls": count, "seconds": res["seconds"], "urls_per_s": count / res["seconds"],
                "producer_pss_mb": res["pss"] / 1e6, "queued": queued, "ok": queued == published}
    finally:
        redis.stop()


def chart(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib not installed (pip install -e '.[bench]'): no chart")
        return
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4))
    for ax, w in zip(axes, workloads, strict=True):
        sub = [r for r in rows if r["workload"] == w]
        ax.barh([r["tool"] for r in sub], [r["seconds"] for r in sub])
        ax.set_title(w)
        ax.set_xlabel("seconds (lower is better)")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small workloads, one repeat (CI smoke check)")
    parser.add_argument("--full", action="store_true", help="README workloads, 3 repeats, median")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell (default: 3 full, 1 quick)")
    parser.add_argument("--enqueue", type=int, default=None, help="URLs for the enqueue benchmark")
    parser.add_argument("--only", help="re-measure only the workloads whose name contains this text, or only the "
                                       "enqueue figure with --only enqueue (the rest is kept from the last run)")
    parser.add_argument("--tool", help="re-measure only the tools whose name contains this text (or one of several, "
                                       "comma-separated); the other rows are kept from the last run")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up of servers and workers
    compile_project()
    quick = not args.full
    workloads, repeats = (QUICK, 1) if quick else (FULL, 3)
    repeats = args.repeats or repeats
    if args.only:
        workloads = {k: v for k, v in workloads.items() if args.only in k}

    def chosen(tool: str) -> bool:
        if args.tool:
            return any(part in tool for part in args.tool.split(","))
        return not quick or tool.startswith(QUICK_TOOLS)

    work = Path(tempfile.mkdtemp(prefix="fleetfetch-bench-"))
    work.chmod(0o755)  # nginx's worker processes run as an unprivileged user
    machine = (f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
               f"{machine_speed()}")
    print(f"fleetfetch bench ({'quick' if quick else 'full'}, {repeats} repeat(s), median), {machine}; origin: "
          f"{'nginx' if shutil.which('nginx') else 'python'}; Redis without persistence (workers rows)")
    print(f"{'workload':<26} {'tool':<34} {'seconds':>8} {'files/s':>8} {'MB/s':>7} {'PSS MB':>6} {'workers':>7} "
          f"{'CPU ms/URL':>8} {'cmds/URL':>6}")
    name = "quick" if quick else "latest"
    partial = args.only or args.tool
    previous = json.loads((RESULTS / f"{name}.json").read_text()) if partial else None
    try:
        rows = run_workloads(work, workloads, repeats, chosen) if args.only != "enqueue" else []
        if previous:
            fresh = {(r["workload"], r["tool"]) for r in rows}
            rows = [r for r in previous["rows"] if (r["workload"], r["tool"]) not in fresh] + rows
            order = list(workloads) + [w for w in dict.fromkeys(r["workload"] for r in previous["rows"])]
            rows.sort(key=lambda r: order.index(r["workload"]) if r["workload"] in order else len(order))
        if previous and args.only != "enqueue":
            enq = previous["enqueue"]
        else:
            enq = enqueue_benchmark(work, args.enqueue or (50_000 if quick else 1_000_000))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"enqueue: {enq['urls']} URLs in {enq['seconds']:.1f} s = {enq['urls_per_s']:.0f} URLs/s, producer peak "
          f"PSS {enq['producer_pss_mb']:.0f} MB, {enq['queued']} queued")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"machine": machine, "when": time.strftime("%Y-%m-%d %H:%M"),
                                                      "repeats": repeats, "rows": rows, "enqueue": enq}, indent=1))
    chart(rows, RESULTS / f"{name}.png")
    failed = [r for r in rows if not r["ok"]] + ([] if enq["ok"] else [enq])
    return 1 if failed else 0
