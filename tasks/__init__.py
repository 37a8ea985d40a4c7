"""fleetfetch workers: `celery -A tasks worker` finds the Celery app here.

The app is loaded on first use (PEP 562), not on `import tasks`: the pure policy modules (message, errors,
retry, naming, guard, redact) import without Celery or requests, so the producer and tests can use them alone.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from .app import app

        return app
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")
