"""Leases of running downloads, kept alive by one timer thread per process.

A URL's lease in the ledger and its host slot both expire unless renewed. Renewing from a timer rather than
between chunks means a stalled read or a host sending slowly never lets them lapse, while a dead process (and
so its timer) lets them lapse within one lease: that is how the reconciler and the host limiter tell a dead
worker from a slow one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import hostlimit
from .ledger import Ledger

log = logging.getLogger("fleetfetch")
_STARTING = threading.Lock()


@dataclass
class Renewer:
    """Renews every lease held in this process each `interval` seconds, in one round trip per kind."""

    ledger: Callable[[], Ledger]
    limiter: Callable[[], hostlimit.HostLimiter]
    url_lease: float
    interval: float
    _held: dict[int, tuple[str | None, int, hostlimit.Lease | None]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pid: int = 0

    @contextlib.contextmanager
    def hold(self, job: str | None, index: int, slot: hostlimit.Lease | None) -> Iterator[None]:
        """Keep the URL's lease (when it belongs to a job) and its host slot (if any) alive inside the block."""
        if job is None and slot is None:
            yield
            return
        self._start()
        token = object()
        with self._lock:
            self._held[id(token)] = (job, index, slot)
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(id(token), None)

    def _start(self) -> None:
        with _STARTING:  # threads of one pool may get here at once
            if self._pid != os.getpid():  # first use in this (possibly forked) process
                self._pid = os.getpid()
                self._held, self._lock = {}, threading.Lock()
                threading.Thread(target=self._loop, name="fleetfetch-leases", daemon=True).start()

    def _loop(self) -> None:
        stop = threading.Event()
        while not stop.wait(self.interval):
            with self._lock:
                held = list(self._held.values())
            if held:
                try:
                    self.renew(held)
                except Exception as exc:  # noqa: BLE001 - a broker outage must not end the timer
                    log.warning("Could not renew %d lease(s): %s", len(held), exc)

    def renew(self, held: list[tuple[str | None, int, hostlimit.Lease | None]]) -> None:
        urls: dict[str, list[int]] = {}
        for job, index, slot in held:
            if job:
                urls.setdefault(job, []).append(index)
            if slot is not None:
                self.limiter().renew(slot)
        if urls:
            self.ledger().renew(urls, self.url_lease)
