"""Wall time and peak memory (PSS: shared pages counted once) of a process tree."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable

import psutil


def tree_pss(roots: list[int]) -> int:
    """Sum of PSS over the processes `roots` and all their descendants."""
    total = 0
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_full_info().pss
    return total


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


def run_measured(argv: list[str], env: dict[str, str], watch: list[int] | None = None,
                 timeout: float = 1800) -> dict[str, float]:
    """Run `argv`; seconds, the peak PSS of its own tree, and of the `watch` trees (e.g. workers)."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    own = PeakSampler(lambda: [proc.pid])
    other = PeakSampler(lambda: watch or [])
    own.start()
    other.start()
    _, err = proc.communicate(timeout=timeout)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "pss": own.stop(), "worker_pss": other.stop(), "rc": proc.returncode,
            "stderr": err.decode(errors="replace")[-500:]}
