"""Screenshots of Flower during a real job, for the README: `python -m tests.support.flower_screenshot docs/`.

Starts its own Redis, an origin on 127.0.0.1 with slow and failing files, two `celery worker` processes
(w1, w2) and Flower, runs a job, and has headless Chromium (Debian's `chromium`) capture Flower's workers and
tasks pages while the job is under way. Flower runs without authentication here because it listens on
127.0.0.1 only and lives for the seconds this takes; the README says to set FLOWER_BASIC_AUTH everywhere else.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.realparts.origin import Origin
from bench.realparts.servers import RedisServer, Worker, free_port
from tests.conftest import ROOT, Cluster, write_list
from tests.test_flower import TASKS_COLUMNS

PAGES = {"flower-workers.png": "/workers", "flower-tasks.png": "/tasks"}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("headless Chromium is needed: apt-get install chromium")


def capture(browser: str, url: str, out: Path) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,800", "--virtual-time-budget=4000", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)


def main(out_dir: str = "docs") -> int:
    browser = chromium()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as server, \
            Origin().start() as origin:
        cluster = Cluster(server, Path(tmp) / "downloads")
        for i in range(120):
            origin.add(f"/reports/report-{i:03d}.pdf", b"%PDF" * 4096, delay=0.2, rate=40_000)
        lines = [origin.url(f"/reports/report-{i:03d}.pdf") for i in range(120)]
        lines += [origin.url("/reports/missing.pdf") + "?token=s3cret", origin.url("/reports/gone.pdf")]
        urls = write_list(Path(tmp) / "urls.txt", lines)
        port = free_port()
        workers = [Worker(cluster.env, name=f"w{n}", concurrency=4, log=Path(tmp) / f"w{n}.log", cwd=ROOT)
                   for n in (1, 2)]
        flower = None
        try:
            for w in workers:
                w.start()
            flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "tasks", "flower", "--address=127.0.0.1",
                                       f"--port={port}", TASKS_COLUMNS], env=cluster.env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            base = f"http://127.0.0.1:{port}"
            _wait_for(base)
            cluster.producer(str(urls), "--no-wait", "-q")
            time.sleep(6)  # the job is under way: tasks succeeded, failed and still running
            for name, page in PAGES.items():
                capture(browser, base + page, out / name)
                print(out / name)
        finally:
            if flower is not None:
                flower.terminate()
                flower.wait(10)
            for w in workers:
                w.stop()
    return 0


def _wait_for(base: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.ConnectionError):
            requests.get(f"{base}/healthcheck", timeout=2)
            return
        time.sleep(0.2)
    raise SystemExit("Flower did not start")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:2]))
