"""Everyday jobs, end to end, as a user runs them: `python -m bench.everyday` (about 2 minutes).

Wall time of `python -m producer LIST` (start-up of local mode included), every file checked by SHA-256:
the example-sized list in local mode, 1000 small files in local mode and on two workers, and a flaky server
(30% of URLs answer 503 + Retry-After: 1 once) with and without per-host politeness. Python origin on
127.0.0.1, fsync on (the default), Redis without persistence for the two-worker rows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker
from bench.run import env_for
from bench.tools import compile_project


def user_env(**extra: str) -> dict[str, str]:
    """The benchmark's environment (loopback allowed) with fleetfetch's own per-host default, as a user has it."""
    env = env_for(**extra)
    del env["FLEETFETCH_PER_HOST"]
    return env


def files(prefix: str, count: int, size: int) -> dict[str, bytes]:
    """Distinct bodies: `size` bytes each, by path."""
    return {f"/{prefix}/{i}.bin": hashlib.sha256(f"{prefix}{i}".encode()).digest() * (size // 32)
            for i in range(count)}


def run_job(origin: Origin, bodies: dict[str, bytes], env: dict[str, str], work: Path, out: Path,
            *args: str) -> tuple[float, str, bool]:
    """Seconds of the job, what came of it (verified files, requests the origin saw), and whether all is well."""
    listing = work / "urls.txt"
    listing.write_text("".join(origin.url(p) + "\n" for p in bodies))
    manifest = work / "m.jsonl"
    origin.reset_stats()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "producer", str(listing), "--manifest", str(manifest), "-q", *args],
                          env=env, cwd=work, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        return seconds, f"FAILED (exit {proc.returncode}): {proc.stderr.strip()[-300:]}", False
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    verified = sum(1 for r, body in zip(records, bodies.values(), strict=True)
                   if r["status"] == "done" and r["sha256"] == hashlib.sha256(body).hexdigest()
                   and hashlib.sha256((out / r["path"]).read_bytes()).hexdigest() == r["sha256"])
    requests = sum(len(origin.requests_for(p)) for p in bodies)
    return seconds, f"{verified}/{len(bodies)} verified, {requests} requests", verified == len(bodies)


def main() -> int:
    compile_project()
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-everyday-"))
    origin = Origin("127.0.0.1").start()
    redis = workers = None
    rows: list[tuple[str, str, float, str, bool]] = []
    try:
        forms = files("forms", 5, 200_000)
        small = files("small", 1000, 16 << 10)
        flaky = files("flaky", 200, 64 << 10)
        for path, body in {**forms, **small, **flaky}.items():
            origin.add(path, body)
        failing = [path for i, path in enumerate(flaky) if i % 10 < 3]

        local = user_env()
        for name, bodies in (("5 x 200 kB (example-sized)", forms), ("1000 x 16 KiB", small)):
            job = work / f"local-{len(bodies)}"
            job.mkdir()
            rows.append((name, "local mode, no options", *run_job(origin, bodies, local, job, job / "downloads")))

        redis = RedisServer(work / "redis", appendonly=False).start()
        out = work / "cluster-out"
        env = user_env(CELERY_BROKER_URL=redis.url(0), CELERY_RESULT_BACKEND=redis.url(1), FLEETFETCH_DIR=str(out))
        workers = [Worker(env, name=f"e{i}", concurrency=2, log=work / f"w{i}.log").start() for i in range(2)]
        rows.append(("1000 x 16 KiB", "2 workers, prefork c=2", *run_job(origin, small, env, work, out, "-d", "small")))
        for how, options in (("2 workers, per-host default", ()), ("2 workers, --per-host 0", ("--per-host", "0"))):
            for path in failing:  # their first request in this run answers 503
                origin.fail(path, [(503, {"Retry-After": "1"})])
            rows.append(("200 x 64 KiB, 30% 503 once", how,
                         *run_job(origin, flaky, env, work, out, "-d", f"flaky{len(rows)}", *options)))
    finally:
        for w in workers or []:
            w.stop()
        if redis:
            redis.stop()
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'job':<28} {'how':<28} {'seconds':>8}  result")
    for name, how, seconds, result, _ in rows:
        print(f"{name:<28} {how:<28} {seconds:8.1f}  {result}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
