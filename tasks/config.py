"""Settings: one object, read once from the environment, shared by workers and the producer."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
QUEUE = "fleetfetch"
THREADS_CONCURRENCY = 32  # uncapped hosts: past ~32 threads the GIL costs more CPU per URL than overlap gains
TASK_NAME = "fleetfetch.download"


def _parse(var: str, raw: str, default: Any) -> Any:
    """A variable's text as the type of the setting's default."""
    try:
        if isinstance(default, bool):
            return raw.lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int | float):
            return type(default)(raw)
        if isinstance(default, tuple):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if isinstance(default, Path):
            return Path(raw)
        return raw
    except ValueError:
        kind = "whole number" if isinstance(default, int) else "number"
        raise SystemExit(f"error: {var}={raw!r} is not a {kind}") from None


@dataclass(frozen=True)
class Settings:
    """Every tunable of fleetfetch, with its default; the README's configuration table mirrors this."""

    broker_url: str | None = None
    result_backend: str | None = None
    download_dir: Path = Path("downloads")
    # Downloads wait on the network: one process per core (Celery's prefork default) fetched a remote-like list
    # 1000 x 64 KiB in 60 s, 32 threads in one process in 8.2 s with 64 MB PSS; 16 prefork children took 9.2 s
    # but 288-516 MB (README, "Choosing a pool").
    pool: str = "threads"
    concurrency: int = 0  # 0 = default_concurrency(pool, per_host)
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
    per_host: int = 8  # politeness: browsers open 6 connections per host, aria2c 1 per server (README)
    host_lease: int = 60
    host_errors: int = 5  # 5xx in a row from one host that pause it; 0 = never
    host_rate: float = 0.0
    no_fsync: bool = False
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
        e = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = e.get(_VARIABLES[f.name], "").strip()
            if raw:
                values[f.name] = _parse(_VARIABLES[f.name], raw, f.default)
        if "visibility_timeout" not in values:
            # Must exceed the time limit: Redis hands an unacknowledged task to another worker after this
            # long, so a shorter value runs a still-running download twice (celery #2599, #5935).
            values["visibility_timeout"] = max(7200, 2 * int(values.get("time_limit", cls.time_limit)))
        return cls(**values)


def default_concurrency(pool: str, per_host: int) -> int:
    """A worker's size when FLEETFETCH_CONCURRENCY and -c leave it open. Prefork processes cost memory each: one
    per core. Threads wait on the network cheaply, but no more of them than the per-host cap: a thread that finds
    its host's slots taken sends its task back to the queue, which costs more than the download (one host, 1000 x
    64 KiB remote-like: 8 threads 16.8 s and 7.8 ms CPU per URL, 32 threads 24.1 s and 18 ms)."""
    if pool != "threads":
        return os.cpu_count() or 2
    return per_host if 0 < per_host < THREADS_CONCURRENCY else THREADS_CONCURRENCY


_VARIABLES = {f: "CELERY_" + f.upper() for f in ("broker_url", "result_backend")} | {
    f: "FLEETFETCH_" + f.upper() for f in (
        "pool", "concurrency", "connect_timeout", "read_timeout", "time_limit", "visibility_timeout",
        "soft_shutdown_timeout", "restore_interval", "result_expires", "max_size", "max_redirects",
        "max_attempts", "backoff_base", "backoff_cap", "max_retry_after", "per_host", "host_lease",
        "host_errors", "host_rate", "no_fsync", "allow_private", "allow_networks", "resolve")
} | {"download_dir": "FLEETFETCH_DIR"}


settings = Settings.from_env()
