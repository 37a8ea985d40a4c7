"""Everything fleetfetch overrides in urllib3, in one module: connections that go to the address the guard checked
(`_new_conn`), plain http:// sockets whose timeout the kernel keeps, and pools that tell a kept-alive connection
from a new one (`_get_conn`).

`unfit()` checks those internals against the urllib3 installed; `patched()` is true only where they are as
expected (urllib3 KNOWN) and FLEETFETCH_STOCK is off. Otherwise `new_pool` makes urllib3's own pools, pinned through
its public options instead: the pool's host is the checked address, TLS checks and SNI use the URL's name
(`server_hostname`) and the request carries the name in its Host header (`stock_headers`).
Both paths connect only to checked addresses; the stock one is slower (a poll before each read) and cannot tell a
kept-alive connection apart exactly.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.poolmanager import SSL_KEYWORDS
from urllib3.util import connection as u3conn

from . import dependencies
from .connection import set_kernel_timeouts

log = logging.getLogger(__name__)

KNOWN = ("2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8")  # urllib3 minor versions read against and tested with


def _eagain_is_a_timeout(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` of a socket whose timeout is the kernel's: EAGAIN (the kernel's timeout ran out) raised as the
    TimeoutError a Python timeout gives."""
    @functools.wraps(method)
    def call(sock: socket.socket, *args: Any) -> Any:
        try:
            return method(sock, *args)
        except BlockingIOError:
            raise TimeoutError("timed out") from None
    return call


class KernelTimeoutSocket(socket.socket):
    """A plain http:// connection's socket once connected: blocking in Python, its timeout kept by the kernel
    (SO_RCVTIMEO, SO_SNDTIMEO), as the Redis connections' (`tasks/connection.py`). A Python timeout polls before
    every send and receive, and changing it is an ioctl: each a system call that lets go of the GIL, a hand-off
    among the pool's threads. A read or write that waits longer than the timeout fails with EAGAIN in the kernel,
    raised here as the TimeoutError a Python timeout gives, so urllib3 and `body_chunks` see a read timeout as
    before. (TLS sockets keep Python's timeouts: the ssl module needs them to tell a stall from a wait.)"""

    __slots__ = ("_kernel_timeout",)
    _kernel_timeout: float | None

    @classmethod
    def adopt(cls, sock: socket.socket) -> KernelTimeoutSocket:
        timeout = sock.gettimeout()
        own = cls(sock.family, sock.type, sock.proto, sock.detach())
        socket.socket.settimeout(own, None)  # blocking in Python (the fd was non-blocking for the timed connect)
        own._kernel_timeout = math.nan  # unequal to every timeout, so the first asked for is set
        own.settimeout(timeout)
        return own

    def settimeout(self, value: float | None) -> None:
        if value != self._kernel_timeout:
            set_kernel_timeouts(self, value)
            self._kernel_timeout = value

    def gettimeout(self) -> float | None:
        return self._kernel_timeout

    recv_into = _eagain_is_a_timeout(socket.socket.recv_into)
    recv = _eagain_is_a_timeout(socket.socket.recv)
    sendall = _eagain_is_a_timeout(socket.socket.sendall)
    send = _eagain_is_a_timeout(socket.socket.send)


class _PinnedMixin:
    """Connect to the address the guard checked instead of resolving the host name again."""

    _ff_address: str
    _ff_kernel_timeouts = False  # plain http: the socket becomes a KernelTimeoutSocket once connected
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        try:
            sock = u3conn.create_connection(
                (self._ff_address, self.port),
                self.timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
            return KernelTimeoutSocket.adopt(sock) if self._ff_kernel_timeouts else sock
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc  # type: ignore[arg-type]


class _PinnedHTTP(_PinnedMixin, HTTPConnection):
    _ff_kernel_timeouts = True

    def __init__(self, *args: Any, ff_address: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._ff_address = ff_address


class _PinnedHTTPS(_PinnedMixin, HTTPSConnection):
    def __init__(self, *args: Any, ff_address: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._ff_address = ff_address


class _KeptAlive:
    """A pool that says whether its latest request went out on a connection kept from an earlier one."""

    reused = False

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        self.reused = conn.sock is not None  # (one the server had already closed, urllib3 replaced by a new one)
        return conn


class _PinnedHTTPPool(_KeptAlive, HTTPConnectionPool):
    ConnectionCls = _PinnedHTTP


class _PinnedHTTPSPool(_KeptAlive, HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPS


# What the subclasses override or call, by owner: each must be there for them to be used.
_USED: dict[Any, tuple[str, ...]] = {
    HTTPConnection: ("_new_conn",),
    HTTPConnectionPool: ("_get_conn", "ConnectionCls"),
    u3conn: ("create_connection",),
}


def unfit(version: str | None = None) -> str | None:
    """Why the subclasses must not be used with the urllib3 here, or with urllib3 `version` (None: they may)."""
    return dependencies.unfit("urllib3", version or urllib3.__version__, KNOWN, _USED)


_patched: bool | None = None
_stock = False


def use_stock(stock: bool) -> None:
    """FLEETFETCH_STOCK: urllib3's own connections for this process (a worker's settings say so at its first
    download, before any connection is made)."""
    global _stock, _patched
    if stock != _stock:
        _stock, _patched = stock, None


def patched() -> bool:
    """Whether this process uses the subclasses; decided once, with one warning line if urllib3 is unknown."""
    global _patched
    if _patched is None:
        reason = None if _stock else unfit()
        if reason is not None:
            log.warning("%s: using urllib3's own connections (slower, as safe)", reason)
        _patched = not _stock and reason is None
    return _patched


def new_pool(scheme: str, host: str, port: int, address: str, pool_kwargs: dict[str, Any]) -> HTTPConnectionPool:
    """A one-connection pool to `host`:`port` that connects to `address` (checked by the guard) only."""
    if scheme != "https":
        pool_kwargs = {k: v for k, v in pool_kwargs.items() if k not in SSL_KEYWORDS}
    if patched():
        cls = _PinnedHTTPSPool if scheme == "https" else _PinnedHTTPPool
        return cls(host, port, maxsize=1, ff_address=address, **pool_kwargs)
    if scheme == "https":
        # server_hostname alone: SNI and OpenSSL's own name check on the URL's name, as for a connection by name
        return HTTPSConnectionPool(address, port, maxsize=1, server_hostname=host, **pool_kwargs)
    return HTTPConnectionPool(address, port, maxsize=1, **pool_kwargs)


def stock_headers(url: str, headers: Any) -> None:
    """A stock pool's host is an address: the request names its host itself (urllib3 then sends no Host of its own)."""
    if not patched() and "Host" not in headers:
        headers["Host"] = urlsplit(url).netloc.rpartition("@")[2]


def went_out_kept_alive(pool: HTTPConnectionPool) -> bool | None:
    """Whether the pool's latest request went out on a connection kept from an earlier one; None if it cannot tell."""
    return pool.reused if isinstance(pool, _KeptAlive) else None
