"""Wall time, peak memory (PSS: shared pages counted once), CPU time and Redis commands of a measured run."""

from __future__ import annotations

import contextlib
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import redis


def _tree(roots: list[int]) -> Iterator[psutil.Process]:
    """The processes `roots` and all their descendants that still exist."""
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            yield from [root, *root.children(recursive=True)]


def tree_pss(roots: list[int]) -> int:
    """Sum of PSS over the processes `roots` and all their descendants."""
    total = 0
    for p in _tree(roots):
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


def tree_cpu(roots: list[int]) -> float:
    """CPU seconds (user + system) used so far by the processes `roots`, their descendants and reaped children."""
    total = 0.0
    for p in _tree(roots):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def redis_counters(client: redis.Redis | None) -> tuple[int, float]:
    """(commands served so far, CPU seconds used so far) of a Redis server; INFO itself is not counted."""
    if client is None:
        return 0, 0.0
    stats = client.info("commandstats")
    calls = sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")
    cpu = client.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


class PeakSampler(threading.Thread):
    """Samples tree_pss(roots()) every `every` seconds and keeps the peak."""

    def __init__(self, roots: Callable[[], list[int]], every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.roots, self.every, self.peak = roots, every, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, tree_pss(self.roots()))
            self._stop_event.wait(self.every)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(argv: list[str], env: dict[str, str], watch: list[int] | None = None,
                 broker: redis.Redis | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run `argv`: seconds; peak PSS of its own tree and of the `watch` trees (e.g. workers); CPU seconds of
    all of them (the tool's tree as reaped children, so a local-mode worker and server count) and of the
    `broker` Redis server; and the commands that server served meanwhile."""
    cpu_before, watch_before = _children_cpu(), tree_cpu(watch or [])
    calls_before, redis_cpu_before = redis_counters(broker)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    own = PeakSampler(lambda: [proc.pid])
    other = PeakSampler(lambda: watch or [])
    own.start()
    other.start()
    _, err = proc.communicate(timeout=timeout)
    seconds = time.perf_counter() - started
    calls_after, redis_cpu_after = redis_counters(broker)
    split = {"cpu_tool_s": _children_cpu() - cpu_before, "cpu_workers_s": tree_cpu(watch or []) - watch_before,
             "cpu_redis_s": redis_cpu_after - redis_cpu_before}
    return {"seconds": seconds, "pss": own.stop(), "worker_pss": other.stop(), "rc": proc.returncode,
            "cpu_s": sum(split.values()), **split,
            "redis_calls": calls_after - calls_before if broker is not None else -1,
            "stderr": err.decode(errors="replace")[-500:]}
