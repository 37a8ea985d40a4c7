"""The HTTP path's foreign exceptions mapped to fleetfetch's own (tasks/errors.py), in one place, by type.

    requests / urllib3 / ssl / socket exception, raised while
      sending a request (`mapped(call)`)            or reading its body (`mapped(call, body=True)`)
          │ the first row of the table whose type matches (most specific first); the reason says what
          ▼ happened in one line, never a header's value or a URL's secret; the time limit wins over a timeout
    PermanentError   TLS refused, invalid URL or header, the time limit
    TransientError   connect or read timeout, connection refused, reset or lost
    └── CutShort     the body ended before Content-Length (body only)

Errors already ours pass through unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import math
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import requests
import urllib3

from .errors import CutShort, DownloadError, PermanentError, TransientError
from .redact import redact_text

TIME_LIMIT_REASON = "time limit exceeded (FLEETFETCH_TIME_LIMIT)"
# User-facing reasons for socket errors, chosen by errno (never by matching message text).
_ERRNO_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by peer (broken pipe)",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connection timed out",
}
_NO_RESPONSE = "connection closed without a response"
# What a request sent on a connection the server had just closed fails with.
DROPPED_REASONS = {_NO_RESPONSE, _ERRNO_REASONS[errno.ECONNRESET], _ERRNO_REASONS[errno.EPIPE]}
# OpenSSL verify codes of a certificate whose issuer is not among the trusted CAs (X509_V_ERR_...): 18 self-signed
# leaf, 19 self-signed CA in the chain, 20 unable to get local issuer.
_UNKNOWN_ISSUER = {18, 19, 20}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: a header name that may be shown


@dataclass(frozen=True)
class Call:
    """What a reason may name about the request that failed."""

    connect_timeout: float
    read_timeout: float
    deadline: float = math.inf
    ca_bundle: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def time_left(deadline: float) -> float:
    """Seconds until `deadline`; PermanentError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise PermanentError(TIME_LIMIT_REASON)
    return left


def _timed_out(reason: str) -> Callable[[BaseException, Call], DownloadError]:
    def make(_exc: BaseException, call: Call) -> DownloadError:
        time_left(call.deadline)  # past the deadline, the time limit is the reason
        return TransientError(reason.format(connect=call.connect_timeout, read=call.read_timeout))
    return make


def _lost_mid_body(exc: BaseException, _call: Call) -> DownloadError:
    if any(isinstance(e, http.client.IncompleteRead | urllib3.exceptions.IncompleteRead) for e in causes(exc)):
        return CutShort("body cut short (connection closed early)")
    return TransientError(f"connection lost mid-body ({known_reason(exc) or redact_text(_root_cause(exc))})")


Row = tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[BaseException, Call], DownloadError]]
# requests' classes: ConnectTimeout and SSLError are ConnectionErrors, InvalidHeader is a ValueError.
_REQUEST: list[Row] = [
    (requests.exceptions.ConnectTimeout, _timed_out("connect timed out after {connect:g} s")),
    (requests.exceptions.ReadTimeout, _timed_out("read timed out after {read:g} s")),
    (requests.exceptions.SSLError, lambda e, c: PermanentError(_tls_reason(e, c.ca_bundle))),
    (requests.exceptions.ConnectionError, lambda e, c: TransientError(connection_reason(e))),
    (requests.exceptions.InvalidHeader, lambda e, c: PermanentError(_invalid_header(c.headers))),
    ((requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, ValueError),
     lambda e, c: PermanentError(f"invalid URL: {redact_text(str(e))}")),
]
_BODY: list[Row] = [  # TimeoutError is an OSError: first
    ((urllib3.exceptions.ReadTimeoutError, TimeoutError), _timed_out("read timed out after {read:g} s (stalled)")),
    ((urllib3.exceptions.ProtocolError, urllib3.exceptions.HTTPError, OSError), _lost_mid_body),
]


@contextlib.contextmanager
def mapped(call: Call, body: bool = False) -> Iterator[None]:
    """Raise the failure of what runs inside as fleetfetch's own exception (request side, or `body` side)."""
    try:
        yield
    except DownloadError:
        raise
    except Exception as exc:
        for types, make in _BODY if body else _REQUEST:
            if isinstance(exc, types):
                raise make(exc, call) from None
        raise


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception it wraps: causes, contexts, urllib3's `reason`, exceptions among `args`."""
    todo: list[object] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]


def _root_cause(exc: BaseException) -> str:
    last = list(causes(exc))[-1]
    return str(last) or type(last).__name__


def _tls_reason(exc: BaseException, ca_bundle: str | None) -> str:
    """One line for a failed TLS handshake; a refused certificate says why (OpenSSL's verify message) and, when
    its issuer is unknown, which CAs were trusted."""
    for e in causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
            reason = f"TLS error: certificate verify failed: {e.verify_message.rstrip('.')}"
            if e.verify_code in _UNKNOWN_ISSUER:
                reason += (" (not issued by a CA in FLEETFETCH_CA_BUNDLE)" if ca_bundle else
                           " (not issued by a CA in certifi's bundle; FLEETFETCH_CA_BUNDLE sets the trusted CAs)")
            return redact_text(reason)
    return f"TLS error: {redact_text(_root_cause(exc))}"


def known_reason(exc: BaseException) -> str | None:
    """The user-facing reason of a connection failure, chosen by exception type and errno; None if unknown."""
    found = list(causes(exc))
    for e in found:  # the socket's own error first: urllib3's NewConnectionError is also a "timeout" class
        if isinstance(e, OSError) and e.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[e.errno]
    for e in found:
        if isinstance(e, http.client.RemoteDisconnected):
            return _NO_RESPONSE
        if isinstance(e, TimeoutError | urllib3.exceptions.TimeoutError) and not isinstance(
                e, urllib3.exceptions.NewConnectionError):
            return "read timed out"
    return None


def connection_reason(exc: BaseException) -> str:
    return known_reason(exc) or f"connection failed: {redact_text(_root_cause(exc))}"


def _invalid_header(headers: dict[str, str]) -> str:
    """The reason of a header requests refuses (its text quotes the value: a cookie, a token), naming the header
    and never its value."""
    for name, value in headers.items():
        try:
            requests.utils.check_header_validity((name, value))
        except requests.exceptions.InvalidHeader:
            shown = name if _TOKEN.fullmatch(name) else "(a name that is not a token)"
            return f"invalid request header {shown}: a line break or a leading space in it (not sent)"
    return "invalid request header"
