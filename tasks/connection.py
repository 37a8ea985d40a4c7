"""A Redis connection one thread owns: its read and write timeouts are the kernel's, and several scripts go over
it in one round trip (`together`).

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

import contextlib
import socket
import struct
from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script


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


ScriptCall = tuple[Script, list[Any], list[Any]]  # a registered script, its keys and its arguments


def together(client: redis.Redis, calls: Sequence[ScriptCall]) -> list[Any]:
    """The replies of `calls`, sent in one round trip: their EVALSHAs written at once on the client's own
    connection (`client_for(..., own_connection=True)`), then read in order. A download ends with two scripts,
    its final state in the ledger and its host slot given back; sent one after the other, each costs a write and
    a read (each letting go of the GIL) and a wait for the answer. (A redis-py pipeline would ask
    SCRIPT EXISTS first, a round trip of its own, and take a second connection from the pool.) A call the
    server could not run because it lacks the script (it restarted) or that got no reply (the connection
    broke) is sent again alone, through the Script and the client's retries: the scripts must be idempotent."""
    replies: list[Any] = [None] * len(calls)
    missing = list(range(len(calls)))
    conn = client.connection
    if conn is not None:  # else a pooled client: one call at a time
        with getattr(client, "single_connection_lock", contextlib.nullcontext()):  # redis-py >= 5.1 has it
            try:
                conn.send_packed_command(conn.pack_commands(
                    [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args in calls]))
                for i in range(len(calls)):  # every reply is read, errors too: the connection stays in step
                    try:
                        replies[i] = conn.read_response()
                    except redis.exceptions.NoScriptError:
                        continue
                    except redis.ResponseError as exc:
                        replies[i] = exc
                    missing.remove(i)
            except (redis.ConnectionError, redis.TimeoutError):
                conn.disconnect()
    for i in missing:
        script, keys, args = calls[i]
        replies[i] = script(keys=keys, args=args)
    for reply in replies:
        if isinstance(reply, redis.ResponseError):
            raise reply
    return replies
