"""HTTP with requests: the one place that connects, follows redirects and streams bodies.

Every hop is resolved once by the guard and the connection goes to that checked address (no DNS rebinding),
while the Host header and TLS name/certificate checks stay on the URL's host name.
"""

from __future__ import annotations

import http.cookiejar
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.poolmanager import SSL_KEYWORDS
from urllib3.util import connection as u3conn

from . import guard
from .errors import CutShort, PermanentError, TransientError
from .message import is_secret_header
from .retry import RETRYABLE_STATUS, parse_retry_after
from .version import VERSION

CHUNK = 1 << 20
USER_AGENT = f"fleetfetch/{VERSION} python-requests/{requests.__version__}"
REDIRECTS = (301, 302, 303, 307, 308)
_MAX_POOLS = 64


class _PinnedMixin:
    """Connect to the address the guard checked instead of resolving the host name again."""

    _ff_address: str
    host: str
    port: int
    timeout: Any
    source_address: Any
    socket_options: Any

    def _new_conn(self) -> socket.socket:
        try:
            return u3conn.create_connection(
                (self._ff_address, self.port),
                self.timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc  # type: ignore[arg-type]


class _PinnedHTTP(_PinnedMixin, HTTPConnection):
    def __init__(self, *args: Any, ff_address: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._ff_address = ff_address


class _PinnedHTTPS(_PinnedMixin, HTTPSConnection):
    def __init__(self, *args: Any, ff_address: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._ff_address = ff_address


class _PinnedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _PinnedHTTP


class _PinnedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPS


class PinnedAdapter(HTTPAdapter):
    """A requests adapter whose pools are keyed by (scheme, host, port, checked address)."""

    def __init__(self) -> None:
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.pins: dict[tuple[str, int], str] = {}
        self._pools: OrderedDict[tuple, HTTPConnectionPool] = OrderedDict()

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):  # type: ignore[override]
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        scheme, host, port = host_params["scheme"], host_params["host"], host_params["port"]
        port = port or (443 if scheme == "https" else 80)
        address = self.pins.get((host, port))
        if address is None:  # fail closed: nothing connects without a guard check
            raise PermanentError(f"refused: {host}:{port} was not checked by the destination policy")
        key = (scheme, host, port, address, tuple(sorted((k, repr(v)) for k, v in pool_kwargs.items())))
        pool = self._pools.get(key)
        if pool is None:
            if scheme == "https":
                pool = _PinnedHTTPSPool(host, port, maxsize=1, ff_address=address, **pool_kwargs)
            else:
                plain = {k: v for k, v in pool_kwargs.items() if k not in SSL_KEYWORDS}
                pool = _PinnedHTTPPool(host, port, maxsize=1, ff_address=address, **plain)
            self._pools[key] = pool
            while len(self._pools) > _MAX_POOLS:
                self._pools.popitem(last=False)[1].close()
        self._pools.move_to_end(key)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        super().close()


class ProxiedAdapter(HTTPAdapter):
    """Through the job's explicit --proxy: the proxy connects to each destination, so a hop's host is checked by
    the policy (`pins` records it) but cannot be pinned; the connection to the proxy goes to its checked address."""

    def __init__(self) -> None:
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.pins: dict[tuple[str, int], str] = {}


_local = threading.local()


def session() -> tuple[requests.Session, PinnedAdapter]:
    """One session per thread (so per pool process, or per thread in the threads pool), reused."""
    if getattr(_local, "session", None) is None:
        s = requests.Session()
        s.trust_env = False  # an environment proxy would connect on our behalf, bypassing the pinning
        s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))  # no cookies kept
        s.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        adapter = PinnedAdapter()
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        _local.session, _local.adapter = s, adapter
    return _local.session, _local.adapter


def proxied_session(proxy: str, policy: guard.Policy) -> tuple[requests.Session, ProxiedAdapter]:
    """A session whose requests go through `proxy` (http://[user:password@]host:port), reused per thread; the
    proxy's own address must pass the destination policy and is the one connected to."""
    parts = urlsplit(proxy)
    port = parts.port or 1080
    try:
        address = guard.resolve(parts.hostname or "", port, policy)
    except guard.Refused as exc:
        raise PermanentError(f"proxy {parts.hostname}: {exc}") from None
    except LookupError as exc:
        raise TransientError(f"proxy {parts.hostname}: {exc}") from None
    host = f"[{address}]" if ":" in address else address
    userinfo = parts.netloc.rpartition("@")[0]
    pinned = parts._replace(netloc=f"{userinfo}@{host}:{port}" if userinfo else f"{host}:{port}").geturl()
    cached = getattr(_local, "proxied", None)
    if cached is not None and cached[0] == pinned:
        return cached[1], cached[2]
    if cached is not None:
        cached[1].close()
    s = requests.Session()
    s.trust_env = False
    s.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    s.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    s.proxies = {"http": pinned, "https": pinned}
    adapter = ProxiedAdapter()
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    _local.proxied = (pinned, s, adapter)
    return s, adapter


@dataclass(frozen=True)
class Limits:
    connect_timeout: float
    read_timeout: float
    max_redirects: int
    policy: guard.Policy


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return p.scheme.lower(), (p.hostname or "").lower(), p.port


def _pin(adapter: PinnedAdapter | ProxiedAdapter, url: str, policy: guard.Policy) -> None:
    guard.check_scheme(url)
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise PermanentError(f"invalid port in {url}") from None
    host = parts.hostname
    if not host:
        raise PermanentError("URL has no host")
    try:
        address = guard.resolve(host, port, policy)
    except guard.Refused as exc:
        raise PermanentError(str(exc)) from None
    except LookupError as exc:
        raise TransientError(str(exc)) from None
    adapter.pins[(urllib3.util.parse_url(url).host or host, port)] = address


def open_response(url: str, headers: dict[str, str], limits: Limits,
                  per_host: Callable[[str], dict[str, str]] | None = None, proxy: str | None = None
                  ) -> requests.Response:
    """GET `url`, following redirects by hand: every hop is re-checked; credentials stay with their host.
    `per_host(hop_url)`: headers for that hop's host only (netrc, cookies), unless the user set the same header.
    `proxy`: the job's explicit --proxy (never one from the environment)."""
    s, adapter = session() if proxy is None else proxied_session(proxy, limits.policy)
    adapter.pins.clear()  # only this download's checked hops may connect
    start_origin = _origin(url)
    seen: set[str] = set()
    current = url
    for _hop in range(limits.max_redirects + 1):
        _pin(adapter, current, limits.policy)
        hop_headers = dict(headers)
        if _origin(current) != start_origin:
            hop_headers = {k: v for k, v in hop_headers.items() if not is_secret_header(k)}
        if per_host is not None:
            given = {k.lower() for k in hop_headers}
            hop_headers.update({k: v for k, v in per_host(current).items() if k.lower() not in given})
        seen.add(current)
        response = _send(s, current, hop_headers, limits)
        if response.status_code not in REDIRECTS or "location" not in response.headers:
            return response
        response.close()
        current = urljoin(current, response.headers["location"])
        if _origin(current) != start_origin:
            current = _strip_userinfo(current)
        if current in seen:
            raise PermanentError(f"redirect loop at {current}")
    raise PermanentError(f"too many redirects (more than {limits.max_redirects})")


def _strip_userinfo(url: str) -> str:
    p = urlsplit(url)
    netloc = p.netloc.rsplit("@", 1)[-1]
    return p._replace(netloc=netloc).geturl()


def _send(s: requests.Session, url: str, headers: dict[str, str], limits: Limits) -> requests.Response:
    timeout = (limits.connect_timeout, limits.read_timeout)
    try:
        response = s.get(url, headers=headers, stream=True, allow_redirects=False, timeout=timeout)
    except requests.exceptions.ConnectTimeout:
        raise TransientError(f"connect timed out after {limits.connect_timeout:g} s") from None
    except requests.exceptions.ReadTimeout:
        raise TransientError(f"read timed out after {limits.read_timeout:g} s") from None
    except requests.exceptions.SSLError as exc:
        raise PermanentError(f"TLS error: {_root_cause(exc)}") from None
    except requests.exceptions.ConnectionError as exc:
        raise TransientError(_connection_reason(exc)) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, ValueError) as exc:
        raise PermanentError(f"invalid URL: {exc}") from None
    status = response.status_code
    if status >= 400:
        reason = f"{status} {response.reason or ''}".strip()
        response.close()
        if status in RETRYABLE_STATUS:
            after = parse_retry_after(response.headers.get("retry-after"))
            raise TransientError(reason, retry_after=after, status=status)
        raise PermanentError(reason, status=status)
    return response


def _root_cause(exc: BaseException) -> str:
    while exc.__context__ is not None or exc.__cause__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc) or type(exc).__name__


def _connection_reason(exc: BaseException) -> str:
    text = str(exc)
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "Connection reset" in text or "Errno 104" in text:
        return "connection reset by peer"
    if "Read timed out" in text or "timed out" in text:
        return "read timed out"
    return f"connection failed: {_root_cause(exc)}"


def body_chunks(response: requests.Response, read_timeout: float, size: int = CHUNK) -> Iterator[bytes]:
    """The raw body (nothing decompressed) in chunks; a cut or stalled connection becomes TransientError."""
    raw = response.raw
    try:
        while True:
            chunk = raw.read(size, decode_content=False)
            if not chunk:
                return
            yield chunk
    except (urllib3.exceptions.ReadTimeoutError, TimeoutError):
        raise TransientError(f"read timed out after {read_timeout:g} s (stalled)") from None
    except (urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError, OSError) as exc:
        if "IncompleteRead" in repr(exc):
            raise CutShort("body cut short (connection closed early)") from None
        raise TransientError(f"connection lost mid-body ({_root_cause(exc)})") from None
    finally:
        response.close()
