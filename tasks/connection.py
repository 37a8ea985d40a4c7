"""A Redis connection whose read and write timeouts are the kernel's, for a connection one thread owns.

A Python socket with a timeout polls before every send and every receive: a Redis round trip is then four system
calls, each letting go of the GIL, instead of two. In a threads pool every one of them is a hand-off of the GIL
among the pool's threads (a futex wake and wait, a context switch): the most expensive thing a download task
does per URL after the download itself. This connection's socket is blocking in Python (no timeout, so no poll)
and carries the same timeout in the kernel (SO_RCVTIMEO, SO_SNDTIMEO): a read or write that waits longer fails
with EAGAIN, which redis-py reports as a ConnectionError (retried as a TimeoutError would be), so a dead or
stalled server is still noticed after `socket_timeout` seconds instead of hanging the thread.

Only plain TCP connections (redis://) are made so (`ledger.client_for`); rediss:// keeps redis-py's own.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import redis


class KernelTimeoutConnection(redis.Connection):
    def __init__(self, *, socket_timeout: float | None = None, **kwargs: Any) -> None:
        if kwargs.get("socket_connect_timeout") is None:  # redis-py's default: the socket timeout
            kwargs["socket_connect_timeout"] = socket_timeout
        super().__init__(socket_timeout=None, **kwargs)
        self.kernel_timeout = socket_timeout

    def _connect(self) -> socket.socket:
        sock: socket.socket = super()._connect()
        if self.kernel_timeout:
            seconds = int(self.kernel_timeout)
            wait = struct.pack("ll", seconds, int((self.kernel_timeout - seconds) * 1_000_000))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wait)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
        return sock
