"""HTTP with requests: the one place that connects, follows redirects and streams bodies.

Every hop is resolved once by the guard and the connection goes to that checked address (no DNS rebinding),
while the Host header and TLS name/certificate checks stay on the URL's host name.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connectionpool import HTTPConnectionPool

from . import dependencies, guard, http_errors, urllib3_hooks
from .errors import PermanentError, TransientError
from .http_errors import time_left
from .message import is_secret_header
from .redact import redact_url
from .retry import RETRYABLE_STATUS, parse_retry_after
from .version import USER_AGENT

dependencies.check(requests, urllib3)  # before urllib3_hooks relies on them: one line and exit 2 when too old
CHUNK = 1 << 20
REDIRECTS = (301, 302, 303, 307, 308)
# urllib3 logs each request line (path and query: signed-URL tokens) at DEBUG; a worker run with
# --loglevel=DEBUG must not write those secrets to its log.
logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)


class PinnedAdapter(HTTPAdapter):
    """A requests adapter that connects only to checked addresses: one pool, for the (scheme, host, port, checked
    address) of the thread's latest request. Its one connection is kept alive between downloads from the same
    origin (curl and aria2c reuse theirs too: no connect per URL, and a server spawns no handler per request);
    a request to another origin or address closes it, so a thread holds at most one idle connection."""

    def __init__(self) -> None:
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.pins: dict[tuple[str, int], str] = {}
        self._key: tuple | None = None
        self._pool: HTTPConnectionPool | None = None
        self._kept = False  # the latest request's pool had served an earlier one

    def get_connection_with_tls_context(self, request, verify, proxies=None, cert=None):  # type: ignore[override]
        host_params, pool_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        scheme, host, port = host_params["scheme"], host_params["host"], host_params["port"]
        port = port or (443 if scheme == "https" else 80)
        address = self.pins.get((host, port))
        if address is None:  # fail closed: nothing connects without a guard check
            raise PermanentError(f"refused: {host}:{port} was not checked by the destination policy")
        key = (scheme, host, port, address, tuple(sorted((k, repr(v)) for k, v in pool_kwargs.items())))
        self._kept = self._pool is not None and key == self._key
        if not self._kept:
            self.close_pool()
            self._pool = urllib3_hooks.new_pool(scheme, host, port, address, pool_kwargs)
            self._key = key
        return self._pool

    def add_headers(self, request: requests.PreparedRequest, **kwargs: Any) -> None:
        urllib3_hooks.stock_headers(request.url or "", request.headers)

    def kept_alive_died(self, exc: BaseException) -> bool:
        """The request failed because the server closed the kept-alive connection it went out on (a server may
        close an idle connection just as a request arrives): worth one more try at once, on a new connection, as
        curl and browsers do. Not a sign of stress, and no attempt of the URL is spent on it."""
        if self._pool is None or http_errors.known_reason(exc) not in http_errors.DROPPED_REASONS:
            return False
        reused = urllib3_hooks.went_out_kept_alive(self._pool)
        return self._kept if reused is None else reused  # stock pools: the pool served an earlier request

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._pool = self._key = None

    def close(self) -> None:
        self.close_pool()
        super().close()


class ProxiedAdapter(HTTPAdapter):
    """Through the job's explicit --proxy: the proxy connects to each destination, so a hop's host is checked by
    the policy (`pins` records it) but cannot be pinned; the connection to the proxy goes to its checked address.
    An https hop is a CONNECT tunnel (urllib3's): TLS runs end to end inside it, with SNI and the certificate
    check on the URL's name, so the proxy relays ciphertext only (tests/test_https.py)."""

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


def forget_session() -> None:
    """Close this thread's sessions and their connections: a thread that ends (a segment's) leaves none open."""
    for name in ("session", "proxied"):
        held = getattr(_local, name, None)
        if held is not None:
            (held if isinstance(held, requests.Session) else held[1]).close()
            setattr(_local, name, None)


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
    ca_bundle: str | None = None  # FLEETFETCH_CA_BUNDLE: the CAs https hops are verified against; None = certifi's


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return p.scheme.lower(), (p.hostname or "").lower(), p.port


def _pin(adapter: PinnedAdapter | ProxiedAdapter, url: str, policy: guard.Policy) -> None:
    """Check one hop (scheme, address) and pin its connection to the checked address."""
    try:
        guard.check_scheme(url)
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        host = parts.hostname
        pool_host = urllib3.util.parse_url(url).host
    except guard.Refused as exc:
        raise PermanentError(str(exc)) from None
    except (ValueError, urllib3.exceptions.LocationParseError):
        raise PermanentError(f"invalid URL: {redact_url(url)}") from None
    if not host:
        raise PermanentError("URL has no host")
    try:
        address = guard.resolve(host, port, policy)
    except (guard.Refused, guard.NoSuchHost) as exc:
        raise PermanentError(str(exc)) from None
    except LookupError as exc:
        raise TransientError(str(exc)) from None
    adapter.pins[(pool_host or host, port)] = address


def open_response(url: str, headers: dict[str, str], limits: Limits, deadline: float = math.inf,
                  per_host: Callable[[str], dict[str, str]] | None = None, proxy: str | None = None
                  ) -> requests.Response:
    """GET `url`, following redirects by hand: every hop is re-checked; credentials stay with their host.
    Nothing waits past `deadline` (a time.monotonic() value): timeouts shrink to the time left.
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
            # A netrc login stays with the origin it was given for, as -H and a URL's user:password do (curl's
            # rule): never to another port or scheme of its host, so never over an https->http downgrade.
            other = _origin(current) != start_origin
            hop_headers.update({k: v for k, v in per_host(current).items()
                                if k.lower() not in given and not (other and k.lower() == "authorization")})
        seen.add(current)
        response = _send(s, adapter, current, hop_headers, limits, deadline)
        if response.status_code not in REDIRECTS or "location" not in response.headers:
            return response
        response.close()
        try:
            current = urljoin(current, response.headers["location"])
            if _origin(current) != start_origin:
                current = _strip_userinfo(current)
        except ValueError:
            raise PermanentError(f"invalid redirect from {redact_url(current)}") from None
        if current in seen:
            raise PermanentError(f"redirect loop at {redact_url(current)}")
    raise PermanentError(f"too many redirects (more than {limits.max_redirects})")


def _strip_userinfo(url: str) -> str:
    p = urlsplit(url)
    netloc = p.netloc.rsplit("@", 1)[-1]
    return p._replace(netloc=netloc).geturl()


def _get(s: requests.Session, adapter: PinnedAdapter | ProxiedAdapter, url: str, headers: dict[str, str],
         limits: Limits, deadline: float) -> requests.Response:
    left = time_left(deadline)
    timeout = (min(limits.connect_timeout, left), min(limits.read_timeout, left))
    # Both adapters take `verify` from here: the pinned pools and the proxy's CONNECT tunnels alike.
    try:
        return adapter.send(_prepare(s, url, headers), stream=True, timeout=timeout, verify=limits.ca_bundle or True,
                            proxies=s.proxies)
    except requests.exceptions.ConnectionError as exc:
        if not (isinstance(adapter, PinnedAdapter) and adapter.kept_alive_died(exc)):
            raise
    return _get(s, adapter, url, headers, limits, deadline)  # the failed connection is gone: this one is new


def _prepare(s: requests.Session, url: str, headers: dict[str, str]) -> requests.PreparedRequest:
    """The GET that `s.get(url, headers=headers)` would send, prepared as requests prepares it (URL quoted and
    checked, header values checked, user:password in the URL as Basic auth), without the per-call merging of what
    these sessions never hold (cookies: none are kept; auth, hooks; settings from the environment: trust_env is off).
    Sent with the adapter's own `send`, which skips Session.send's cookie extraction and its look at where a redirect
    would go (followed by hand here): the merging was ~9 % of a worker's Python time on the remote-like list."""
    p = requests.PreparedRequest()
    p.prepare_method("GET")
    p.prepare_url(url, None)
    merged = CaseInsensitiveDict(s.headers)
    merged.update(headers)
    p.prepare_headers(merged)
    # user:password in the URL (the body of a GET is None already, so nothing else to prepare); an Authorization
    # header the user gave wins, as in curl.
    if "@" in url and "authorization" not in merged:
        p.prepare_auth(None, url)
    return p


def _send(s: requests.Session, adapter: PinnedAdapter | ProxiedAdapter, url: str, headers: dict[str, str],
          limits: Limits, deadline: float) -> requests.Response:
    call = http_errors.Call(limits.connect_timeout, limits.read_timeout, deadline, limits.ca_bundle, headers)
    with http_errors.mapped(call):
        response = _get(s, adapter, url, headers, limits, deadline)
    status = response.status_code
    if status >= 400:
        reason = f"{status} {response.reason or ''}".strip()
        response.close()
        if status in RETRYABLE_STATUS:
            after = parse_retry_after(response.headers.get("retry-after"))
            raise TransientError(reason, retry_after=after, status=status)
        raise PermanentError(reason, status=status)
    return response


def _limit_next_read(response: requests.Response, seconds: float) -> None:
    """Make the next socket read wait at most `seconds` (the read timeout, or less near the deadline). Only a
    change is made: `settimeout` lets go of the GIL (an ioctl), and far from the deadline it is the same each read."""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None and sock.gettimeout() != seconds:
        sock.settimeout(seconds)


def body_chunks(response: requests.Response, read_timeout: float, deadline: float = math.inf,
                size: int = CHUNK) -> Iterator[bytes]:
    """The raw body (nothing decompressed) in chunks; a cut or stalled connection becomes TransientError.

    Each chunk is one socket read (`read1`) whose timeout is the read timeout or the time left, whichever is
    shorter: a server that drips a byte at a time cannot hold the download past its deadline, in any pool
    (the threads pool has no Celery time limit at all).
    """
    raw = response.raw
    try:
        with http_errors.mapped(http_errors.Call(0, read_timeout, deadline), body=True):
            while True:
                _limit_next_read(response, min(read_timeout, time_left(deadline)))
                chunk = raw.read1(size, decode_content=False)
                if not chunk:  # the whole body (urllib3 has given the connection back to the pool for the next one)
                    return
                yield chunk
    finally:
        response.close()
