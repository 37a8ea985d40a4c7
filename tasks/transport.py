"""kombu's Redis broker transport with one synchronous Redis client per channel instead of one per command.

kombu's Redis channel builds a new `redis.Redis` object for each command it sends outside BRPOP
(`conn_or_acquire()` -> `_create_client()`): the QoS bookkeeping of every message (MULTI ZADD HSET EXEC when it
is delivered, MULTI ZREM HDEL EXEC when it is acknowledged), the restore sweeps and publishing. Building one costs
more than sending the commands (an event dispatcher, a response-callback table: ~6% of a worker's CPU per URL).
A `redis.Redis` on a connection pool holds no connection of its own: each command checks one out of the pool and
gives it back, so one client serves every thread of a threads pool at once. Only the synchronous client is kept;
the asynchronous one (`Channel.client`, the BRPOP connection the event loop polls) stays kombu's own.

The kept client is tied to the pool it was made for: kombu drops its pools after a fork and when it closes or
reconnects a channel (`_disconnect_pools`), and the next command then gets a client on the new pool.

Its connections over plain TCP keep their timeout in the kernel instead of polling before each read and write
(tasks/connection.py): the QoS bookkeeping of each message and its BRPOP are two system calls fewer each.
"""

from __future__ import annotations

from typing import Any, cast

import redis
from kombu.transport import redis as kombu_redis

from .connection import KernelTimeoutConnection


class Channel(kombu_redis.Channel):
    # redis:// (rediss:// and unix sockets keep redis-py's classes); kombu's stubs want redis.Connection itself
    connection_class = cast("type[redis.Connection]", KernelTimeoutConnection)
    _sync: tuple[Any, Any] | None = None  # (connection pool, redis.Redis on it)

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool  # kombu makes a new one after _disconnect_pools
        kept = self._sync
        if kept is None or kept[0] is not pool:
            kept = (pool, super()._create_client())
            self._sync = kept  # one assignment: threads racing here each get a working client
        return kept[1]


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Make redis:// and rediss:// broker URLs use this transport, in this process.

    kombu resolves a URL's scheme to a transport class through TRANSPORT_ALIASES only after it has parsed the URL
    by that scheme (host, port, password, db, TLS options and the `rediss` default): pointing the two aliases here
    changes the class and nothing else. Celery's `broker_transport` setting would not do: an explicit transport
    replaces the URL's scheme as the connection's transport name (it then shows in the worker's banner and skips
    kombu's rediss handling), and it would apply to an amqp:// broker too. Other schemes (amqp://, sentinel://)
    keep kombu's transports."""
    from kombu import transport

    for scheme in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        transport._transport_cache.pop(scheme, None)  # a class resolved before this call is not kept
