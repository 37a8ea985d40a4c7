"""What a follower of a job waits on between two looks at its counters, and a worker's feeder between two ticks."""

from __future__ import annotations

import contextlib
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


class EndWatch:
    """A wait that ends early when the job's last URL ends: the ledger's scripts publish on the job's `ended`
    channel then (`announce_if_ended`), so its follower reports the end at once instead of at its next poll of
    the counters (up to 0.1 s later). The subscription has a connection of its own that does not retry: while
    the server is away, a wait just sleeps its time, and the follower's look at the counters says what is wrong.
    A message missed (published before the subscription) costs one poll interval, nothing more. The same wait on
    ledger.FEED_CHANNEL wakes a worker's feeder when a job's window has room (feed.Sweeper)."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        pool = client.connection_pool
        kwargs = dict(pool.connection_kwargs, retry=Retry(NoBackoff(), 0))
        self._client = redis.Redis(connection_pool=redis.ConnectionPool(
            connection_class=pool.connection_class, **kwargs))
        self.channel = channel
        self._sub: redis.client.PubSub | None = None

    def wait(self, seconds: float) -> bool:
        """Up to `seconds`; True if the job's end was announced meanwhile."""
        deadline = time.monotonic() + seconds
        try:
            if self._sub is None:
                self._sub = self._client.pubsub(ignore_subscribe_messages=True)
                self._sub.subscribe(self.channel)
            while (left := deadline - time.monotonic()) > 0:
                if self._sub.get_message(timeout=left) is not None:
                    return True
        except (redis.RedisError, OSError):
            self.close()
            time.sleep(max(0.0, deadline - time.monotonic()))
        return False

    def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._sub.close()
            self._sub = None
        self._client.connection_pool.disconnect()

    def __enter__(self) -> EndWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
