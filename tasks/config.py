"""Settings: one object, read once from the environment, shared by workers and the producer."""

from __future__ import annotations

import ipaddress
import math
import os
import ssl
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
QUEUE = "fleetfetch"
THREADS_CONCURRENCY = 32  # uncapped hosts: past ~32 threads the GIL costs more CPU per URL than overlap gains
TASK_NAME = "fleetfetch.download"


POOLS = ("prefork", "threads", "solo")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class BadSetting(SystemExit):
    """A setting that cannot work: the program stops at start with one `error:` line and exit status 2,
    instead of failing every URL later."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _parse(var: str, raw: str, default: Any) -> Any:
    """A variable's text as the type of the setting's default."""
    if isinstance(default, bool):
        if raw.lower() not in _TRUE | _FALSE:
            raise BadSetting(f"error: {var}={raw!r} is not a yes/no value (use 1 or 0)")
        return raw.lower() in _TRUE
    if isinstance(default, int | float):
        try:
            value = type(default)(raw)
        except ValueError:
            kind = "whole number" if isinstance(default, int) else "number"
            raise BadSetting(f"error: {var}={raw!r} is not a {kind}") from None
        if not math.isfinite(value):
            raise BadSetting(f"error: {var}={raw!r} is not a finite number")
        return value
    if isinstance(default, tuple):
        return tuple(p.strip() for p in raw.split(",") if p.strip())
    if isinstance(default, Path):
        return Path(raw)
    return raw


# Lower bounds of numeric settings (a value below makes no sense or breaks a promise).
_AT_LEAST = {
    "concurrency": 0, "connect_timeout": 0.001, "read_timeout": 0.001, "time_limit": 1, "soft_shutdown_timeout": 0,
    "restore_interval": 1, "result_expires": 1, "max_size": 0, "max_redirects": 0, "max_attempts": 1,
    "backoff_base": 0, "backoff_cap": 0, "max_retry_after": 0, "per_host": 0, "host_lease": 1, "host_errors": 0,
    "host_rate": 0, "window": 1, "split": 1, "min_split_size": 0,
}


def _check_network(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise BadSetting(f"error: FLEETFETCH_ALLOW_NETWORKS: {value!r} is not a network ({exc}); "
                         "write e.g. 10.1.0.0/16 or fd00::/8") from None


def _check_resolve(value: str) -> None:
    host, _, rest = value.partition(":")
    port, _, address = rest.partition(":")
    try:
        ok = bool(host) and port.isdecimal() and int(port) <= 65535
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        ok = False
    if not ok:
        raise BadSetting(f"error: FLEETFETCH_RESOLVE: {value!r} is not HOST:PORT:ADDRESS (PORT 0 = any), "
                         "e.g. files.example:443:192.0.2.7")


def _check_ca_bundle(path: str) -> None:
    """A readable PEM file holding at least one certificate (loaded once here, so a typo stops the worker at start
    instead of failing every https URL)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
        return
    except ssl.SSLError:  # an OSError too: check it first
        problem = "holds no PEM certificate"
    except OSError as exc:
        problem = f"cannot be read ({exc.strerror or exc})"
    raise BadSetting(f"error: FLEETFETCH_CA_BUNDLE={path!r} {problem}; give a PEM file of the CA certificates "
                     "trusted for https (unset: certifi's bundle)")


def validate(s: Settings) -> None:
    """Refuse settings that cannot work, naming the variable and what to write instead."""
    for name, low in _AT_LEAST.items():
        if getattr(s, name) < low:
            raise BadSetting(f"error: {_VARIABLES[name]}={getattr(s, name)!r} must be at least {low}")
    if s.pool not in POOLS:
        raise BadSetting(f"error: FLEETFETCH_POOL={s.pool!r}: use one of {', '.join(POOLS)}")
    if s.visibility_timeout <= s.time_limit:
        raise BadSetting(f"error: FLEETFETCH_VISIBILITY_TIMEOUT={s.visibility_timeout} must exceed "
                         f"FLEETFETCH_TIME_LIMIT={s.time_limit} (else a running download is started twice)")
    for network in s.allow_networks:
        _check_network(network)
    for entry in s.resolve:
        _check_resolve(entry)
    if s.ca_bundle is not None:
        _check_ca_bundle(s.ca_bundle)


@dataclass(frozen=True)
class Settings:
    """Every tunable of fleetfetch, with its default; the README's configuration table mirrors this."""

    broker_url: str | None = None
    result_backend: str | None = None
    download_dir: Path = Path("downloads")
    # Downloads wait on the network: one process per core (Celery's prefork default) fetched a remote-like list
    # 1000 x 64 KiB in 60 s, 32 threads in one process in 8.2 s with 64 MB PSS; 16 prefork children took 9.2 s
    # but 288-516 MB (docs/operations.md, "Choosing a pool").
    pool: str = "threads"
    concurrency: int = 0  # 0 = default_concurrency(pool, per_host)
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    time_limit: int = 3600
    visibility_timeout: int = 7200
    soft_shutdown_timeout: float = 60.0
    restore_interval: int = 10
    url_lease: int = 60  # a running URL not heard of for this long has lost its worker: it is published again
    sweep_interval: int = 15  # how often one worker looks for URLs whose lease ran out or whose message was lost
    # Messages of one job in the broker at once; the rest waits in the ledger and is published as they drain
    # (feed.Feeder): Redis holds ~590 bytes per message but ~120 per URL waiting in the ledger (docs/window.md).
    window: int = 50_000
    max_redeliveries: int = 5  # a URL whose worker died this many times fails (it may be what kills them)
    result_expires: int = 3 * 24 * 3600
    max_size: int = 10 * 1024**3
    max_redirects: int = 10
    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    max_retry_after: float = 300.0
    # The most downloads in flight per host, cluster-wide (curl --parallel's default, all to one host): a host's
    # window starts at hostlimit.START (8; browsers open 6) and grows only while the host keeps up (README).
    per_host: int = 50
    host_lease: int = 60
    host_errors: int = 5  # 5xx in a row from one host that pause it; 0 = never
    host_rate: float = 0.0
    # Connections per big file (tasks/segments.py), each a slot of the host's window: 8 is the window a host starts
    # with (hostlimit.START), so one big file never asks more of a host than eight small ones would.
    split: int = 8
    min_split_size: int = 20 << 20  # aria2c's default: smaller files are always one stream
    no_fsync: bool = False
    # The workers share the download directory (NFS, a ReadWriteMany volume): a big file's pieces are spread over
    # them as helper tasks (tasks/shared.py).
    shared_volume: bool = False
    allow_private: bool = False
    allow_networks: tuple[str, ...] = ()
    resolve: tuple[str, ...] = field(default=())
    # The CA certificates https destinations are verified against; None = certifi's bundle. The environment's
    # REQUESTS_CA_BUNDLE is not read (sessions ignore the environment: its proxies would bypass the pinning).
    ca_bundle: str | None = None
    # kombu's own Redis transport and urllib3's own connections instead of fleetfetch's faster subclasses
    # (tasks/kombu_redis.py, tasks/urllib3_hooks.py): for a kombu or urllib3 they do not know, or to rule them out.
    stock: bool = False

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
        settings = cls(**values)
        validate(settings)
        return settings


def default_concurrency(pool: str, per_host: int, processes: int = 1) -> int:
    """The size of a worker (or of `processes` threads workers together) when FLEETFETCH_CONCURRENCY and -c leave
    it open. Prefork processes cost memory each: one per core. Threads wait on the network cheaply: up to
    THREADS_CONCURRENCY per process, but no more in all than the per-host ceiling, as many as a one-host list can
    use (the threads past a host's window wait for a slot in place)."""
    if pool != "threads":
        return os.cpu_count() or 2
    most = THREADS_CONCURRENCY * processes
    return min(per_host, most) if per_host > 0 else most


_VARIABLES = {f: "CELERY_" + f.upper() for f in ("broker_url", "result_backend")} | {
    f: "FLEETFETCH_" + f.upper() for f in (
        "pool", "concurrency", "connect_timeout", "read_timeout", "time_limit", "visibility_timeout",
        "soft_shutdown_timeout", "restore_interval", "url_lease", "sweep_interval", "window", "max_redeliveries",
        "result_expires", "max_size", "max_redirects",
        "max_attempts", "backoff_base", "backoff_cap", "max_retry_after", "per_host", "host_lease",
        "host_errors", "host_rate", "split", "min_split_size", "no_fsync", "shared_volume", "allow_private",
        "allow_networks", "resolve", "ca_bundle",
        "stock")
} | {"download_dir": "FLEETFETCH_DIR"}


def attach(app: Any, settings: Settings) -> None:
    """The settings a Celery app was made with (`tasks.app.create_app`), for what runs in its workers."""
    app.fleetfetch_settings = settings


def settings_of(app: Any) -> Settings:
    """The settings `app` was made with; the process's for an app made otherwise."""
    found: Settings = getattr(app, "fleetfetch_settings", None) or settings
    return found


def _load() -> Settings:
    """The process's settings; on a bad one, its `error:` line on stderr and exit status 2 (also in a worker,
    which then refuses to start)."""
    try:
        return Settings.from_env()
    except BadSetting as exc:
        print(exc.message, file=sys.stderr, flush=True)
        raise


settings = _load()
