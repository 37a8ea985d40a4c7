"""Health files that probes read without starting Python: one for "the process lives", one for "connected".

With FLEETFETCH_HEARTBEAT_FILE set (the image sets /tmp/fleetfetch-worker.alive; unset = off):

- ``<file>`` is touched every FLEETFETCH_HEARTBEAT_INTERVAL seconds (default 5) by a thread of the worker's main
  process, whatever the broker does. A liveness probe checks its age (``find -mmin -1``): it fails only when
  the process is gone or frozen, never because Redis is down, so an outage does not restart every worker and
  kill downloads that were fine (celery #4079 is what `celery inspect ping` as a probe does instead).
- ``<file>.ready`` exists while the worker's consumer is connected to the broker and taking tasks: created when
  the consumer starts, removed when it loses the connection, shuts down, or (left over from a killed process)
  when the next worker boots. A readiness probe tests for it (``test -f``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from celery import Celery, bootsteps

logger = logging.getLogger(__name__)

HEARTBEAT_FILE = os.environ.get("FLEETFETCH_HEARTBEAT_FILE", "").strip()


def _interval(raw: str) -> float:
    """Seconds between beats: FLEETFETCH_HEARTBEAT_INTERVAL, default 5, well inside the probes' one minute."""
    try:
        value = float(raw or 5.0)
    except ValueError:
        value = 0.0
    if not 0 < value <= 30:
        raise SystemExit(f"error: FLEETFETCH_HEARTBEAT_INTERVAL={raw!r} is not a number of seconds between 0 and 30 "
                         "(the liveness probe allows one minute): unset it for the default 5")
    return value


INTERVAL_S = _interval(os.environ.get("FLEETFETCH_HEARTBEAT_INTERVAL", "").strip())


def ready_path(alive: str | Path) -> Path:
    """The readiness marker that belongs to a heartbeat file."""
    return Path(f"{alive}.ready")


def _touch(path: Path) -> OSError | None:
    try:
        path.touch()
        return None
    except OSError as exc:
        return exc


class Heartbeat(bootsteps.StartStopStep):
    """Worker step: a daemon thread of the main process touches the heartbeat file every INTERVAL_S seconds.

    A thread, not the worker's timer: the timer runs in the consumer's event loop, which does not turn while
    the consumer waits to reconnect to the broker, and a stale file would then restart a healthy worker. It
    keeps beating through a warm shutdown (no stop()): the pod's grace period, not the probe, bounds that.
    """

    label = "heartbeat"

    def include_if(self, w: object) -> bool:
        return bool(HEARTBEAT_FILE)

    def start(self, w: object) -> None:
        alive = Path(HEARTBEAT_FILE)
        ready_path(alive).unlink(missing_ok=True)  # a killed worker's marker says nothing about this one
        error = _touch(alive)
        if error:
            logger.warning("heartbeat: cannot touch %s (liveness probes will fail): %s", alive, error)
        beat = threading.Thread(target=self._beat, args=(alive, error is not None), name="fleetfetch-heartbeat",
                                daemon=True)
        beat.start()
        logger.info("heartbeat: touching %s every %s s", alive, INTERVAL_S)

    @staticmethod
    def _beat(alive: Path, failing: bool) -> None:
        while True:
            time.sleep(INTERVAL_S)
            error = _touch(alive)
            if error and not failing:  # once per failure, not every few seconds
                logger.warning("heartbeat: cannot touch %s (liveness probes will fail): %s", alive, error)
            elif failing and not error:
                logger.info("heartbeat: %s is written again", alive)
            failing = error is not None


class Ready(bootsteps.StartStopStep):
    """Consumer step: started once connected and consuming, stopped when the connection is lost or at shutdown."""

    label = "ready marker"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def include_if(self, c: object) -> bool:
        return bool(HEARTBEAT_FILE)

    def start(self, c: object) -> None:
        error = _touch(ready_path(HEARTBEAT_FILE))
        if error:
            logger.warning("heartbeat: cannot create %s (readiness probes will fail): %s",
                           ready_path(HEARTBEAT_FILE), error)

    def stop(self, c: object) -> None:
        ready_path(HEARTBEAT_FILE).unlink(missing_ok=True)

    shutdown = stop


def install(app: Celery) -> None:
    """Add both steps to the app's worker (no-ops unless FLEETFETCH_HEARTBEAT_FILE is set)."""
    app.steps["worker"].add(Heartbeat)
    app.steps["consumer"].add(Ready)
