"""A Redis connection one thread owns: its read and write timeouts are the kernel's.

A Python socket with a timeout polls before every send and every receive: a Redis round trip is then four system
calls, each letting go of the GIL, instead of two. In a threads pool every one of them is a hand-off of the GIL
among the pool's threads (a futex wake and wait, a context switch): the most expensive thing a download task
does per URL after the download itself. This connection's socket is blocking in Python (no timeout, so no poll)
and carries the same timeout in the kernel (SO_RCVTIMEO, SO_SNDTIMEO): a read or write that waits longer fails
with EAGAIN, which redis-py reports as a ConnectionError (retried as a TimeoutError would be), so a dead or
stalled server is still noticed after `socket_timeout` seconds instead of hanging the thread.

Only plain TCP connections (redis://) are made so (`ledger.client_for`, and kombu's through
`transport.Channel`); rediss:// and unix sockets keep redis-py's own. Plain http:// downloads do the same
(`urllib3_hooks.KernelTimeoutSocket`).
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
            set_kernel_timeouts(sock, self.kernel_timeout)
        return sock


def set_kernel_timeouts(sock: socket.socket, seconds: float | None) -> None:
    """A read or a write on `sock` fails with EAGAIN after waiting `seconds` (None: waits for ever). Unlike
    `settimeout` (an ioctl), `setsockopt` keeps the GIL."""
    whole = micros = 0  # 0 s 0 µs is "for ever" to the kernel
    if seconds is not None:
        whole = max(0, int(seconds))
        micros = max(0 if whole else 1, int((seconds - whole) * 1_000_000))  # at least 1 µs, never "for ever"
    wait = struct.pack("ll", whole, micros)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wait)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
