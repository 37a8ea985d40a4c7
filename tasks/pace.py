"""--limit-rate: a download's bytes kept to an average rate, however many connections (threads) bring them."""

from __future__ import annotations

import threading
import time


class Pace:
    """Sleeps while the bytes counted so far are ahead of `rate` bytes per second (the average since the start).
    `chunk`: the read size that keeps the pacing smooth (a tenth of a second's worth, 4 KiB to `largest`)."""

    def __init__(self, rate: int, largest: int) -> None:
        self.rate = rate
        self.chunk = min(largest, max(4096, rate // 10)) if rate > 0 else largest
        self.began, self.bytes = time.monotonic(), 0
        self._lock = threading.Lock()  # a file fetched in ranges: every connection counts against one rate

    def wait(self, n: int, deadline: float) -> None:
        if self.rate <= 0:
            return
        with self._lock:
            self.bytes += n
            ahead = self.bytes / self.rate - (time.monotonic() - self.began)
        if ahead > 0:
            time.sleep(min(ahead, max(0.0, deadline - time.monotonic())))
