"""Run every tool on every workload, verify the output, print a table, write JSON and a chart.

    python -m bench --quick     # CI smoke check, well under a minute of downloads, one repeat
    python -m bench --full      # README figures, 3 repeats, median
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.measure import run_measured
from bench.origins import Nginx, PythonOrigin, plain_origin
from tests.support.servers import RedisServer, Worker

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FULL = {"2000 x 16 KiB": (2000, 16 << 10, False), "100 x 4 MiB": (100, 4 << 20, False),
        "1 x 1 GiB": (1, 1 << 30, False), "500 x 64 KiB WAN-like": (500, 64 << 10, True)}
QUICK = {"200 x 16 KiB": (200, 16 << 10, False), "10 x 4 MiB": (10, 4 << 20, False),
         "1 x 64 MiB": (1, 64 << 20, False), "50 x 64 KiB WAN-like": (50, 64 << 10, True)}
WAN_DELAY, WAN_RATE = 0.05, 1_000_000  # 50 ms to first byte, 1 MB/s per connection


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "FLEETFETCH_"))}
    env.update(PYTHONPATH=str(ROOT), FLEETFETCH_ALLOW_NETWORKS="127.0.0.0/8", FLEETFETCH_PER_HOST="0", **extra)
    return env


def make_files(root: Path, count: int, size: int) -> None:
    root.mkdir(parents=True)
    block = os.urandom(min(size, 1 << 20))
    for i in range(count):
        with open(root / f"f{i}.bin", "wb") as fh:
            left = size
            while left:
                fh.write(block[: min(left, len(block))])
                left -= min(left, len(block))


def verify(out: Path, count: int, size: int) -> bool:
    files = [p for p in out.rglob("f*.bin") if p.is_file()]
    return len(files) == count and all(p.stat().st_size == size for p in files)


class Cluster:
    """The benchmark's own Redis (no persistence: speed) and N `celery worker` processes."""

    def __init__(self, work: Path, workers: int, pool: str, concurrency: int) -> None:
        self.redis = RedisServer(work / f"redis-{workers}-{pool}", appendonly=False).start()
        self.env = env_for(CELERY_BROKER_URL=self.redis.url(0), CELERY_RESULT_BACKEND=self.redis.url(1),
                           FLEETFETCH_DIR=str(work / "cluster-out"), FLEETFETCH_NO_FSYNC="1")
        self.workers: list[Worker] = []
        try:
            for i in range(workers):
                self.workers.append(Worker(self.env, name=f"b{i}-{pool}", concurrency=concurrency, pool=pool,
                                           log=work / f"w{i}-{pool}.log").start())
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis.stop()


def tools(work: Path, quick: bool) -> dict[str, Callable[[Path, Path], tuple[list[str], dict, list[int]]]]:
    py = sys.executable
    local_env = env_for(FLEETFETCH_NO_FSYNC="1")
    clusters: dict[str, Cluster] = {}

    def cluster_tool(workers: int, pool: str, c: int) -> Callable:
        def build(listing: Path, out: Path) -> tuple[list[str], dict, list[int]]:
            key = f"{workers}-{pool}-{c}"
            if key not in clusters:
                clusters[key] = Cluster(work, workers, pool, c)
            cl = clusters[key]
            sub = out.relative_to(work / "cluster-out")
            return [py, "-m", "producer", str(listing), "-d", str(sub), "-q"], cl.env, cl.pids()
        return build

    def curl(listing: Path, out: Path) -> tuple[list[str], dict, list[int]]:
        cfg = out.parent / (out.name + ".curl")
        cfg.write_text("".join(f'url = "{u}"\noutput = "{out / u.rsplit("/", 1)[1]}"\n'
                               for u in listing.read_text().split()))
        return ["curl", "--parallel", "--parallel-immediate", "--parallel-max", "50", "-sS", "-K",
                str(cfg)], env_for(), []

    table: dict[str, Callable] = {
        "curl --parallel 50": curl,
        "aria2c -j16": lambda listing, out: (["aria2c", "-i", str(listing), "-d", str(out), "-j", "16", "-q",
                                              "--allow-overwrite=true", "--auto-file-renaming=false",
                                              "--file-allocation=none"], env_for(), []),
        "process per URL": lambda listing, out: ([py, str(ROOT / "bench" / "per_process.py"), str(listing),
                                                  str(out)], env_for(), []),
        "fleetfetch local": lambda listing, out: ([py, "-m", "producer", str(listing), "-d", str(out), "-q"],
                                                  local_env, []),
        "fleetfetch 1 worker prefork c=2": cluster_tool(1, "prefork", 2),
        "fleetfetch 1 worker threads c=50": cluster_tool(1, "threads", 50),
        "fleetfetch 2 workers threads c=50": cluster_tool(2, "threads", 50),
    }
    if not shutil.which("aria2c"):
        print("note: aria2c not installed (apt-get install aria2): column skipped")
        table.pop("aria2c -j16")
    table["_clusters"] = lambda: clusters  # type: ignore[assignment]
    return table


def run_workloads(work: Path, workloads: dict, repeats: int, quick: bool) -> list[dict]:
    rows: list[dict] = []
    kit = tools(work, quick)
    clusters = kit.pop("_clusters")
    try:
        for label, (count, size, wan) in workloads.items():
            files = work / "site" / label.replace(" ", "_")
            make_files(files, count, size)
            origin: Nginx | PythonOrigin = (PythonOrigin(files, WAN_DELAY, WAN_RATE) if wan
                                            else plain_origin(files, work / "nginx" / files.name))
            listing = work / f"{files.name}.txt"
            listing.write_text("".join(f"{origin.base_url}/f{i}.bin\n" for i in range(count)))
            try:
                for tool, build in kit.items():
                    if wan is False and tool.startswith("fleetfetch") and "threads" in tool and quick:
                        continue
                    rows.append(measure_cell(work, label, tool, build, listing, count, size, repeats))
                    print(format_row(rows[-1]), flush=True)
            finally:
                origin.stop()
                shutil.rmtree(files, ignore_errors=True)
    finally:
        for cl in clusters().values():
            cl.stop()
    return rows


def measure_cell(work: Path, label: str, tool: str, build: Callable, listing: Path, count: int, size: int,
                 repeats: int) -> dict:
    runs = []
    for r in range(repeats):
        out = work / "cluster-out" / f"{abs(hash((label, tool)))}-{r}"
        out.mkdir(parents=True)
        argv, env, watch = build(listing, out)
        res = run_measured(argv, env, watch)
        res["ok"] = res["rc"] == 0 and verify(out, count, size)
        runs.append(res)
        shutil.rmtree(out, ignore_errors=True)
    seconds = statistics.median(r["seconds"] for r in runs)
    return {"workload": label, "tool": tool, "ok": all(r["ok"] for r in runs), "seconds": seconds,
            "files_per_s": count / seconds, "mb_per_s": count * size / 1e6 / seconds,
            "pss_mb": max(r["pss"] for r in runs) / 1e6, "worker_pss_mb": max(r["worker_pss"] for r in runs) / 1e6,
            "stderr": runs[-1]["stderr"] if not all(r["ok"] for r in runs) else ""}


def format_row(row: dict) -> str:
    status = "" if row["ok"] else "  FAIL " + row["stderr"].strip().replace("\n", " ")[-200:]
    workers = f"{row['worker_pss_mb']:7.0f}" if row["worker_pss_mb"] else "      -"
    return (f"{row['workload']:<24} {row['tool']:<34} {row['seconds']:8.2f} {row['files_per_s']:9.0f} "
            f"{row['mb_per_s']:8.1f} {row['pss_mb']:7.0f} {workers}{status}")


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
        return {"urls": count, "seconds": res["seconds"], "urls_per_s": count / res["seconds"],
                "producer_pss_mb": res["pss"] / 1e6, "queued": queued, "ok": queued == count}
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
    parser.add_argument("--enqueue", type=int, default=None, help="URLs for the enqueue benchmark")
    parser.add_argument("--only", help="re-measure only the workloads whose name contains this text, or only the "
                                       "enqueue figure with --only enqueue (the rest is kept from the last run)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up of servers and workers
    quick = not args.full
    workloads, repeats = (QUICK, 1) if quick else (FULL, 3)
    if args.only:
        workloads = {k: v for k, v in workloads.items() if args.only in k}
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-bench-"))
    work.chmod(0o755)  # nginx's worker processes run as an unprivileged user
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    print(f"fleetfetch bench ({'quick' if quick else 'full'}), {machine}; origin: "
          f"{'nginx' if shutil.which('nginx') else 'python'}; Redis without persistence; fsync off for all")
    print(f"{'workload':<24} {'tool':<34} {'seconds':>8} {'files/s':>9} {'MB/s':>8} {'PSS MB':>7} {'workers':>7}")
    name = "quick" if quick else "latest"
    previous = json.loads((RESULTS / f"{name}.json").read_text()) if args.only else None
    try:
        rows = run_workloads(work, workloads, repeats, quick)
        if previous:
            rows = [r for r in previous["rows"] if r["workload"] not in workloads] + rows
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
                                                      "rows": rows, "enqueue": enq}, indent=1))
    chart(rows, RESULTS / f"{name}.png")
    failed = [r for r in rows if not r["ok"]] + ([] if enq["ok"] else [enq])
    return 1 if failed else 0
