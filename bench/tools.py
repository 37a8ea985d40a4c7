"""The tools the bench compares, each with the settings it runs with (stated in every row of the table).

fleetfetch runs in two configurations:
* defaults: what a new user gets. `python -m producer LIST` with no options (local mode), or workers started as
  the README's cluster section says (`celery -A tasks worker --loglevel=INFO`, no flags, no FLEETFETCH_*
  variables). The only variable set is FLEETFETCH_ALLOW_NETWORKS=127.0.0.0/8: the origins are on loopback,
  which workers refuse by default.
* tuned: the pool, concurrency, per-host cap and fsync chosen for speed, as before.
"""

from __future__ import annotations

import compileall
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import redis

from bench.realparts.servers import RedisServer, Worker
from producer.local import default_size, worker_sizes
from tasks.config import Settings, default_concurrency

ROOT = Path(__file__).resolve().parent.parent
Build = Callable[[Path, Path], tuple[list[str], dict, list[int], "redis.Redis | None"]]
README_WORKER = ["-m", "celery", "-A", "tasks", "worker", "--loglevel=INFO"]  # the README's cluster section (+ -n)
PER_CORE = ["-m", "tasks.worker", "--per-core"]  # the README's one command for a whole machine (+ -n PREFIX)


def compile_project() -> None:
    """Byte-compile fleetfetch's own modules, as a user's first run leaves them cached: this machine sets
    PYTHONDONTWRITEBYTECODE=1, under which each producer and worker process would compile them from source at
    every start (~30 ms in the producer, more in each worker), which no user's second run does."""
    for package in ("tasks", "producer"):
        compileall.compile_dir(ROOT / package, quiet=1)


def env_for(**extra: str) -> dict[str, str]:
    """The tuned environment: loopback allowed, no per-host cap (every workload comes from one host), and, as on
    a user's machine, no PYTHONDONTWRITEBYTECODE (see compile_project)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "FLEETFETCH_")) and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYTHONPATH=str(ROOT), FLEETFETCH_ALLOW_NETWORKS="127.0.0.0/8", FLEETFETCH_PER_HOST="0", **extra)
    return env


def default_env(**extra: str) -> dict[str, str]:
    """What a new user has: fleetfetch's own defaults, only loopback allowed."""
    env = env_for()
    del env["FLEETFETCH_PER_HOST"]
    env.update(extra)
    return env


def defaults_text(per_host: int | None = None, local: bool = False) -> str:
    """The default settings, as the row label states them (read from tasks.config and local mode, so they stay
    true); `local`: local mode's workers (one threads worker per core)."""
    d = Settings()
    cap = d.per_host if per_host is None else per_host
    cores = os.cpu_count() or 1
    total = d.concurrency or (default_size(d.pool, cap, cores) if local else default_concurrency(d.pool, cap))
    sizes = worker_sizes(d.pool, total, cores) if local else [total]
    workers = f"{len(sizes)} × " if len(sizes) > 1 else ""
    one = worker_sizes(d.pool, total, cores, urls=1) if local else sizes  # local mode: no more workers than URLs
    fewer = f" (fewer workers for fewer URLs: {len(one)} × c={'+'.join(map(str, one))} for a 1-URL list)"
    fewer = fewer if one != sizes else ""
    return f"{workers}{d.pool} c={'+'.join(map(str, sizes))}{fewer}, per-host {cap}, fsync on"


class Cluster:
    """The benchmark's own Redis (no persistence: speed) and N `celery worker` processes."""

    def __init__(self, work: Path, key: str, workers: int, argv: list[str] | None, pool: str, concurrency: int,
                 tuned: bool, extra: dict[str, str] | None = None) -> None:
        self.redis = RedisServer(work / f"redis-{key}", appendonly=False).start()
        make_env = env_for if tuned else default_env
        extra = {**({"FLEETFETCH_NO_FSYNC": "1"} if tuned else {}), **(extra or {})}
        self.env = make_env(CELERY_BROKER_URL=self.redis.url(0), CELERY_RESULT_BACKEND=self.redis.url(1),
                            FLEETFETCH_DIR=str(work / "cluster-out"), **extra)
        self.workers: list[Worker] = []
        try:
            for i in range(workers):
                w = Worker(self.env, name=f"b{i}-{key}", concurrency=concurrency, pool=pool,
                           log=work / f"w{i}-{key}.log")
                if argv is not None:
                    name = f"{key}-w" if argv == PER_CORE else f"w{i + 1}-{key}@%h"  # README: -n w1@%h ...
                    w.argv = [sys.executable, *argv, "-n", name]
                self.workers.append(w.start())
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.redis.stop()


STOCK = {"FLEETFETCH_STOCK": "1"}
# Rows that only say something where the per-host cap binds: one host with many files that each take a while.
CAP_ROWS = ("fleetfetch local, defaults but --per-host 0",)
# Rows for one big file behind a per-connection rate (segmented downloads), and the rows measured beside them there.
SEGMENT_ROWS = ("aria2c -x16 -s16 -k1M", "fleetfetch local, --split 16 --per-host 16")
SEGMENT_PEERS = ("curl --parallel 50", "fleetfetch local, defaults", *SEGMENT_ROWS)
# One big file with two workers that share the download directory (FLEETFETCH_SHARED_VOLUME=1), and its peers.
SHARED_ROW = "fleetfetch 2 workers sharing the volume"
SHARED_PEERS = ("aria2c -x16 -s16 -k1M", "fleetfetch 1 worker, defaults", SHARED_ROW)


def manifest_of(out: Path) -> Path:
    """Where a run that keeps its records writes them (beside its output directory)."""
    return out.parent / f"{out.name}.jsonl"


class Toolbox:
    """name -> (settings text, build(listing, out) -> argv, env, watched pids, broker client)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.clusters: dict[str, Cluster] = {}
        py = sys.executable
        self.table: dict[str, tuple[str, Build]] = {
            "curl --parallel 50": ("50 transfers at once", self._curl),
            # fleetfetch fsyncs each file before it renames it into place (FLEETFETCH_NO_FSYNC=0); curl leaves the
            # bytes in the page cache. This row is curl made as durable: it ends when the disk has them.
            "curl --parallel 50, then sync": ("50 transfers at once, then `sync -f` on the output (on disk, as "
                                              "fleetfetch's fsync)", self._curl_synced),
            "aria2c -j16": ("16 downloads at once", lambda listing, out: (
                ["aria2c", "-i", str(listing), "-d", str(out), "-j", "16", "-q", "--allow-overwrite=true",
                 "--auto-file-renaming=false", "--file-allocation=none"], env_for(), [], None)),
            # aria2c's pieces default to 20 MiB (-k): 96 MiB would get 5 connections. -k1M is how users split.
            "aria2c -x16 -s16 -k1M": ("16 connections per file, 1 MiB pieces", lambda listing, out: (
                ["aria2c", "-i", str(listing), "-d", str(out), "-x16", "-s16", "-k1M", "-q", "--allow-overwrite=true",
                 "--auto-file-renaming=false", "--file-allocation=none"], env_for(), [], None)),
            "fleetfetch local, --split 16 --per-host 16": (
                "`python -m producer LIST --split 16 --per-host 16`", lambda listing, out: (
                    [py, "-m", "producer", str(listing), "-d", str(out), "-q", "--split", "16", "--per-host", "16"],
                    default_env(), [], None)),
            "process per URL": ("one process per URL, body in memory", lambda listing, out: (
                [py, str(ROOT / "bench" / "per_process.py"), str(listing), str(out)], env_for(), [], None)),
            "fleetfetch local, defaults": (
                f"`python -m producer LIST`, no options: {defaults_text(local=True)}", lambda listing, out: (
                    [py, "-m", "producer", str(listing), "-d", str(out), "-q"], default_env(), [], None)),
            "fleetfetch 1 worker, defaults": (
                f"`celery -A tasks worker --loglevel=INFO`, no flags: {defaults_text()}",
                self._cluster("defaults", 1, README_WORKER, "prefork", 0, tuned=False)),
            # The stock path (kombu's own transport, urllib3's own connections): what the fenced patches gain.
            "fleetfetch 1 worker, stock": (
                f"as `1 worker, defaults` with FLEETFETCH_STOCK=1: {defaults_text()}",
                self._cluster("stock", 1, README_WORKER, "prefork", 0, tuned=False, extra=STOCK)),
            "fleetfetch local, stock": (
                f"as `local, defaults` with FLEETFETCH_STOCK=1: {defaults_text(local=True)}", lambda listing, out: (
                    [py, "-m", "producer", str(listing), "-d", str(out), "-q"], default_env(**STOCK), [], None)),
            "fleetfetch 1 machine, one command": (
                f"`python -m tasks.worker --per-core` (a worker per core), no flags: {defaults_text()}",
                self._cluster("percore", 1, PER_CORE, "threads", 0, tuned=False)),
            "fleetfetch 2 workers, defaults": (
                f"2 × `celery -A tasks worker --loglevel=INFO` (one per core, README), no flags: {defaults_text()}",
                self._cluster("defaults2", 2, README_WORKER, "prefork", 0, tuned=False)),
            SHARED_ROW: (
                f"2 × `celery -A tasks worker --loglevel=INFO` with FLEETFETCH_SHARED_VOLUME=1: {defaults_text()}",
                self._cluster("shared", 2, README_WORKER, "threads", 0, tuned=False,
                              extra={"FLEETFETCH_SHARED_VOLUME": "1"}, manifest=True)),
            "fleetfetch local, defaults but --per-host 0": (
                f"`python -m producer LIST --per-host 0`: {defaults_text(per_host=0, local=True)}",
                lambda listing, out: ([py, "-m", "producer", str(listing), "-d", str(out), "-q", "--per-host", "0"],
                                      default_env(), [], None)),
            "fleetfetch local, tuned": (
                "`--pool threads --concurrency 50 --per-host 0`, no fsync", lambda listing, out: (
                    [py, "-m", "producer", str(listing), "-d", str(out), "-q", "--pool", "threads",
                     "--concurrency", "50", "--per-host", "0"], env_for(FLEETFETCH_NO_FSYNC="1"), [], None)),
            "fleetfetch 1 worker prefork c=2": ("`-P prefork -c 2`, per-host 0, no fsync",
                                                self._cluster("prefork2", 1, None, "prefork", 2, tuned=True)),
            "fleetfetch 1 worker threads c=50": ("`-P threads -c 50`, per-host 0, no fsync",
                                                 self._cluster("threads50", 1, None, "threads", 50, tuned=True)),
            "fleetfetch 2 workers threads c=50": ("2 × `-P threads -c 50`, per-host 0, no fsync",
                                                  self._cluster("2threads50", 2, None, "threads", 50, tuned=True)),
        }
        if not shutil.which("aria2c"):
            print("note: aria2c not installed (apt-get install aria2): column skipped")
            self.table.pop("aria2c -j16")
            self.table.pop("aria2c -x16 -s16 -k1M")

    def _curl(self, listing: Path, out: Path) -> tuple[list[str], dict, list[int], None]:
        cfg = out.parent / (out.name + ".curl")
        cfg.write_text("".join(f'url = "{u}"\noutput = "{out / u.rsplit("/", 1)[1]}"\n'
                               for u in listing.read_text().split()))
        return ["curl", "--parallel", "--parallel-immediate", "--parallel-max", "50", "-sS", "-K",
                str(cfg)], env_for(), [], None

    def _curl_synced(self, listing: Path, out: Path) -> tuple[list[str], dict, list[int], None]:
        argv, env, _, _ = self._curl(listing, out)
        return ["sh", "-c", '"$@" && sync -f "$0"', str(out), *argv], env, [], None

    def _cluster(self, key: str, workers: int, argv: list[str] | None, pool: str, c: int, *, tuned: bool,
                 extra: dict[str, str] | None = None, manifest: bool = False) -> Build:
        def build(listing: Path, out: Path) -> tuple[list[str], dict, list[int], redis.Redis]:
            if key not in self.clusters:
                self.clusters[key] = Cluster(self.work, key, workers, argv, pool, c, tuned, extra)
            cl = self.clusters[key]
            sub = out.relative_to(self.work / "cluster-out")
            records = ["--manifest", str(manifest_of(out))] if manifest else []
            return ([sys.executable, "-m", "producer", str(listing), "-d", str(sub), "-q", *records], cl.env,
                    cl.pids(), cl.redis.client(0))
        return build

    def stop(self) -> None:
        for cl in self.clusters.values():
            cl.stop()
        self.clusters.clear()
