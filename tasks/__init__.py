"""fleetfetch workers: `celery -A tasks worker` finds the Celery app here."""

from .app import app

celery = app

__all__ = ["app", "celery"]
