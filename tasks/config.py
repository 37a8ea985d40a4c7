"""Settings: one object, read once from the environment, shared by workers and the producer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
QUEUE = "fleetfetch"
TASK_NAME = "fleetfetch.download"


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"error: {name}={raw!r} is not a whole number") from None


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"error: {name}={raw!r} is not a number") from None


def _flag(env: dict[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _list(env: dict[str, str], name: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in env.get(name, "").split(",") if p.strip())


@dataclass(frozen=True)
class Settings:
    """Every tunable of fleetfetch, with its default; the README's configuration table mirrors this."""

    broker_url: str | None = None
    result_backend: str | None = None
    download_dir: Path = Path("downloads")
    pool: str = "prefork"
    concurrency: int = 0  # 0 = Celery's default (number of cores)
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    time_limit: int = 3600
    visibility_timeout: int = 7200
    soft_shutdown_timeout: float = 60.0
    restore_interval: int = 10
    result_expires: int = 3 * 24 * 3600
    max_size: int = 10 * 1024**3
    max_redirects: int = 10
    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    max_retry_after: float = 300.0
    per_host: int = 8
    host_lease: int = 60
    host_rate: float = 0.0
    fsync: bool = True
    allow_private: bool = False
    allow_networks: tuple[str, ...] = ()
    resolve: tuple[str, ...] = field(default=())

    @property
    def soft_time_limit(self) -> float:
        """When a download gives up by itself: shortly before Celery's hard limit kills its process."""
        return self.time_limit - min(30.0, self.time_limit / 10)

    @property
    def broker(self) -> str:
        return self.broker_url or DEFAULT_BROKER

    @property
    def backend(self) -> str:
        """The result backend; defaults to the broker's Redis, database 1 when the broker uses 0."""
        if self.result_backend:
            return self.result_backend
        if self.broker.startswith(("redis://", "rediss://")) and self.broker.rstrip("/").endswith("/0"):
            return self.broker.rstrip("/")[:-1] + "1"
        return self.broker

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        time_limit = _int(e, "FLEETFETCH_TIME_LIMIT", 3600)
        return cls(
            broker_url=e.get("CELERY_BROKER_URL") or None,
            result_backend=e.get("CELERY_RESULT_BACKEND") or None,
            download_dir=Path(e.get("FLEETFETCH_DIR") or "downloads"),
            pool=e.get("FLEETFETCH_POOL") or "prefork",
            concurrency=_int(e, "FLEETFETCH_CONCURRENCY", 0),
            connect_timeout=_float(e, "FLEETFETCH_CONNECT_TIMEOUT", 10.0),
            read_timeout=_float(e, "FLEETFETCH_READ_TIMEOUT", 30.0),
            time_limit=time_limit,
            # Must exceed the time limit: Redis hands an unacknowledged task to another worker after this
            # long, so a shorter value runs a still-running download twice (celery #2599, #5935).
            visibility_timeout=_int(e, "FLEETFETCH_VISIBILITY_TIMEOUT", max(7200, 2 * time_limit)),
            soft_shutdown_timeout=_float(e, "FLEETFETCH_SOFT_SHUTDOWN_TIMEOUT", 60.0),
            restore_interval=_int(e, "FLEETFETCH_RESTORE_INTERVAL", 10),
            result_expires=_int(e, "FLEETFETCH_RESULT_EXPIRES", 3 * 24 * 3600),
            max_size=_int(e, "FLEETFETCH_MAX_SIZE", 10 * 1024**3),
            max_redirects=_int(e, "FLEETFETCH_MAX_REDIRECTS", 10),
            max_attempts=_int(e, "FLEETFETCH_MAX_ATTEMPTS", 5),
            backoff_base=_float(e, "FLEETFETCH_BACKOFF_BASE", 1.0),
            backoff_cap=_float(e, "FLEETFETCH_BACKOFF_CAP", 60.0),
            max_retry_after=_float(e, "FLEETFETCH_MAX_RETRY_AFTER", 300.0),
            per_host=_int(e, "FLEETFETCH_PER_HOST", 8),
            host_lease=_int(e, "FLEETFETCH_HOST_LEASE", 60),
            host_rate=_float(e, "FLEETFETCH_HOST_RATE", 0.0),
            fsync=not _flag(e, "FLEETFETCH_NO_FSYNC"),
            allow_private=_flag(e, "FLEETFETCH_ALLOW_PRIVATE"),
            allow_networks=_list(e, "FLEETFETCH_ALLOW_NETWORKS"),
            resolve=_list(e, "FLEETFETCH_RESOLVE"),
        )


settings = Settings.from_env()
