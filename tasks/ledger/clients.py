"""Redis clients for the ledger: one that rides out a server restart, and a thread's own (download tasks)."""

from __future__ import annotations

import os
import threading

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ..connection import KernelTimeoutConnection
from .store import Ledger

_own = threading.local()  # this thread's ledgers (`for_thread`)

try:  # redis-py 7+ reads its own version from the package metadata for each connection unless given it (~1 ms)
    from redis.driver_info import DriverInfo

    _DRIVER: dict = {"driver_info": DriverInfo(lib_version=redis.__version__)}
except ImportError:  # older redis-py read it once, at import
    _DRIVER = {}


def client_for(url: str, attempts: int = 12, own_connection: bool = False, timeout: float = 30,
               name: str | None = None) -> redis.Redis:
    """A Redis client that rides out a restart of the server: about a minute of retries with backoff.
    Ledger writes are idempotent (the transition script ignores a repeated state), so replaying is safe.
    `own_connection`: the client keeps one connection for itself (connected now) instead of taking one from its
    pool for each command; it must then serve one thread only. `timeout`: how long a read or a write may wait
    for the server before the call fails (and is retried). `name`: its connections' name in CLIENT LIST."""
    retry = Retry(ExponentialBackoff(cap=10, base=0.2), attempts)
    # A thread's own connection waits for Redis without polling first (tasks/connection.py).
    plain = own_connection and url.startswith("redis://")
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=5, health_check_interval=30,
                                retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                                single_connection_client=own_connection, client_name=name, **_DRIVER,
                                **({"connection_class": KernelTimeoutConnection} if plain else {}))


def for_thread(url: str, ttl: int) -> Ledger:
    """This thread's ledger, on a Redis connection of its own: what a download task uses. A pooled client checks
    each connection it hands out for unread data (two ioctl and a recv, each letting go of the GIL) and gives it
    back after every command; a task sends four scripts per URL from one thread, and a pool of 32 threads grows
    to 32 connections either way. Keyed by process too: a forked child inherits its parent's thread-locals."""
    key = (os.getpid(), url)
    mine: dict[tuple[int, str], Ledger] = _own.__dict__.setdefault("ledgers", {})
    if key not in mine:
        from ..config import settings

        ledger = mine[key] = Ledger(client_for(url, own_connection=True), ttl)
        ledger.feed_low = settings.window // 2  # half the window drained: the feeders top it up (feed.Sweeper)
    return mine[key]
