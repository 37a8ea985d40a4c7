"""A fault-injecting threaded HTTP(S) origin on loopback that records every request it receives (and, over TLS,
every handshake: the server name the client asked for and the address it connected to)."""

from __future__ import annotations

import contextlib
import email.utils
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

CHUNK = 64 * 1024
DROP = 0  # a "status" for Origin.fail: close the connection without an answer


@dataclass
class Record:
    time: float
    method: str
    path: str
    headers: dict[str, str]
    client: str
    concurrent: int = 0  # requests in progress at the origin as this one began, itself included
    port: int = 0  # the client's port: one per connection (requests kept alive share it)
    sent: int = 0  # body bytes written to the connection


@dataclass
class Handshake:
    """One TLS handshake: the SNI server name the client sent, the local address it reached, how it ended."""

    server_name: str | None
    address: str  # the origin's own address the connection came to
    client: tuple[str, int]
    error: str | None = None  # None: completed


@dataclass
class Resource:
    body: bytes
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    etag: str | None = None
    last_modified: str | None = None
    content_type: str = "application/octet-stream"
    delay: float = 0.0
    rate: float | None = None
    cut_after: int | None = None
    cut_times: int = 1
    no_length: bool = False
    ranges: bool = True
    stall: float = 0.0
    content_disposition: str | None = None
    ignore_range: bool = False  # advertise Accept-Ranges, yet answer every range request with the whole body (200)
    busy_ranges: int = 0  # answer this many range requests 503 with Retry-After: 1 (a CDN shedding load)
    lying_range: bool = False  # answer a range with as many bytes from the start of the file (and says so)


class _Headers(dict):
    """Case-insensitive lookups over the headers as received."""

    def __getitem__(self, key: str) -> str:
        for k, v in self.items():
            if k.lower() == key.lower():
                return v
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and any(k.lower() == key.lower() for k in self.keys())

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self[key]
        except KeyError:
            return default


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen() backlog: must be set before the server binds (default 5)
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[socket.socket, Any]:
        """Over TLS, the handshake happens in the connection's own thread (see _Handler.handle), not here in
        the accepting one, where a slow or failing client would hold up every other connection."""
        sock, client = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, client


class Served:
    """A threaded HTTP server of a test, served from a daemon thread; `with` stops it whatever happens."""

    _server: ThreadingHTTPServer | None = None
    port: int = 0

    def _serve(self, server: ThreadingHTTPServer) -> None:
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Origin(Served):
    """`with Origin().start() as o: o.add("/f", b"...")`; `o.requests` lists what clients sent.

    `tls`: serve https with this server context (tests.support.certs); `o.handshakes` then lists each handshake."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self.tls = tls
        self.handshakes: list[Handshake] = []
        self.resources: dict[str, Resource] = {}
        self.failures: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self.redirects: dict[str, tuple[str, int]] = {}
        self.requests: list[Record] = []
        self.current = 0
        self.sent: dict[str, int] = {}  # body bytes written per resource path
        self.max_concurrent = 0
        self._cuts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # configuration ---------------------------------------------------------------------------------
    def add(self, path: str, body: bytes, **options: Any) -> None:
        with self._lock:
            self.resources[path] = Resource(body, **options)
            self._cuts.pop(path, None)

    def fail(self, path: str, statuses: list[int | tuple[int, dict[str, str]]]) -> None:
        with self._lock:
            self.failures[path] = [s if isinstance(s, tuple) else (s, {}) for s in statuses]

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        with self._lock:
            self.redirects[path] = (location, status)

    # lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Origin:
        handler = type("Handler", (_Handler,), {"origin": self})
        server = _Server((self.host, self.port), handler)
        if self.tls is not None:
            self.tls.sni_callback = _note_server_name
            server.tls = self.tls
        self._serve(server)
        return self

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def url(self, path: str, host: str | None = None) -> str:
        """The URL of `path`; with `host`, under that name (which workers map here with FLEETFETCH_RESOLVE)."""
        return f"{'https' if self.tls else 'http'}://{host or self.host}:{self.port}{path}"

    def requests_for(self, path: str) -> list[Record]:
        with self._lock:
            return [r for r in self.requests if r.path == path or r.path.split("?", 1)[0] == path]

    def reset_stats(self) -> None:
        with self._lock:
            self.requests.clear()
            self.max_concurrent = 0

    # used by the handler ---------------------------------------------------------------------------
    def _enter(self, record: Record) -> None:
        with self._lock:
            self.requests.append(record)
            self.current += 1
            record.concurrent = self.current
            self.max_concurrent = max(self.max_concurrent, self.current)

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.sent[key] = self.sent.get(key, 0) + n

    def _handshake(self, record: Handshake) -> None:
        with self._lock:
            self.handshakes.append(record)

    def _leave(self) -> None:
        with self._lock:
            self.current -= 1

    def _next_failure(self, path: str) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            pending = self.failures.get(path)
            return pending.pop(0) if pending else None

    def _should_cut(self, path: str, res: Resource) -> bool:
        with self._lock:
            done = self._cuts.get(path, 0)
            if res.cut_after is None or done >= res.cut_times:
                return False
            self._cuts[path] = done + 1
            return True


_sni = threading.local()  # the server name of the handshake running in this thread


def _note_server_name(conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
    """sni_callback: runs inside do_handshake, in the connection's thread."""
    _sni.name = server_name


class _Handler(BaseHTTPRequestHandler):
    origin: Origin
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as nginx's tcp_nodelay: no 40 ms stall between headers and a small body
    _in_flight = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence
        pass

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            if isinstance(self.connection, ssl.SSLSocket) and not self._tls_handshake(self.connection):
                return
            super().handle()

    def _tls_handshake(self, conn: ssl.SSLSocket) -> bool:
        """Complete the handshake in this thread and record it; False if the client gave up (e.g. on our cert)."""
        _sni.name = None
        error = None
        try:
            conn.do_handshake()
        except OSError as exc:  # ssl.SSLError included: the client's alert, or a connection dropped mid-way
            error = str(exc) or type(exc).__name__
        self.origin._handshake(Handshake(_sni.name, conn.getsockname()[0], self.client_address, error))
        return error is None

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        o = self.origin
        self._record = Record(time.monotonic(), self.command, self.path, _Headers(self.headers.items()),
                              self.client_address[0], port=self.client_address[1])
        o._enter(self._record)
        self._in_flight = True
        try:
            self._respond(head)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self._last_write()

    def _last_write(self) -> None:
        """The response's last bytes are about to go out: the request stops counting as in flight now. Counted
        after them, a client that got them could already have sent its next request (on another connection)
        and be counted twice: max_concurrent would exceed what the client really had in flight."""
        if self._in_flight:
            self._in_flight = False
            self.origin._leave()

    def _lookup(self) -> tuple[str, Resource | None]:
        """Exact path with query first, then the path alone, then equal after percent-decoding (clients
        normalise %2e to '.')."""
        path, plain = self.path, self.path.split("?", 1)[0]
        for key in (path, plain):
            if key in self.origin.resources:
                return key, self.origin.resources[key]
        for key, res in list(self.origin.resources.items()):
            if unquote(key).lower() == unquote(plain).lower():
                return key, res
        return plain, None

    def _respond(self, head: bool) -> None:
        o = self.origin
        plain = self.path.split("?", 1)[0]
        failure = o._next_failure(self.path) or o._next_failure(plain)
        if failure and failure[0] == DROP:
            self.close_connection = True  # as a server closing an idle kept-alive connection just as a request came
            return None
        if failure:
            return self._simple(failure[0], failure[1])
        target = o.redirects.get(self.path) or o.redirects.get(plain)
        if target:
            return self._simple(target[1], {"Location": target[0]})
        key, res = self._lookup()
        if res is None:
            return self._simple(404, {})
        if res.delay:
            time.sleep(res.delay)
        if self._not_modified(res):
            return self._simple(304, self._validators(res), body=False)
        start, end, status = self._range(res)
        if status == 206 and res.busy_ranges > 0:
            with o._lock:
                res.busy_ranges -= 1
            return self._simple(503, {"Retry-After": "1"})
        if status == 416:
            return self._simple(416, {"Content-Range": f"bytes */{len(res.body)}"})
        headers = {"Content-Type": res.content_type, **self._validators(res), **res.headers}
        if res.content_disposition:
            headers["Content-Disposition"] = res.content_disposition
        if res.ranges:
            headers["Accept-Ranges"] = "bytes"
        if status == 206 and res.lying_range:
            start, end = 0, end - start
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(res.body)}"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if res.no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(end - start))
        if head or end == start:
            self._last_write()
        self.end_headers()
        if not head:
            self._body(key, res, res.body[start:end])

    def _body(self, key: str, res: Resource, data: bytes) -> None:
        cut = res.cut_after if self.origin._should_cut(key, res) else None
        if cut is not None:
            data = data[:cut]
        sent, began = 0, time.monotonic()
        piece = max(1024, int(res.rate / 20)) if res.rate else CHUNK  # paced: ~20 writes a second
        for i in range(0, len(data), piece):
            chunk = data[i : i + piece]
            if i + piece >= len(data) and not res.no_length:
                self._last_write()
            self.wfile.write(chunk)
            self.origin._count(key, len(chunk))
            sent += len(chunk)
            self._record.sent = sent
            if res.stall and i == 0:
                self.wfile.flush()
                time.sleep(res.stall)
            if res.rate:
                ahead = sent / res.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        self.wfile.flush()
        if cut is not None:
            self.close_connection = True

    def _validators(self, res: Resource) -> dict[str, str]:
        out = {}
        if res.etag:
            out["ETag"] = res.etag
        if res.last_modified:
            out["Last-Modified"] = res.last_modified
        return out

    def _not_modified(self, res: Resource) -> bool:
        inm, ims = self.headers.get("If-None-Match"), self.headers.get("If-Modified-Since")
        if inm is not None and res.etag:
            return res.etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*"
        if ims is not None and res.last_modified:
            try:
                return email.utils.parsedate_to_datetime(res.last_modified) <= email.utils.parsedate_to_datetime(ims)
            except (TypeError, ValueError):
                return False
        return False

    def _range(self, res: Resource) -> tuple[int, int, int]:
        size = len(res.body)
        spec = self.headers.get("Range")
        if not spec or not res.ranges or res.ignore_range or not spec.startswith("bytes="):
            return 0, size, 200
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in (res.etag, res.last_modified):
            return 0, size, 200
        first, _, last = spec[6:].partition("-")
        try:
            start = int(first)
            end = int(last) + 1 if last else size
        except ValueError:
            return 0, size, 200
        if start >= size:
            return 0, 0, 416
        return start, min(end, size), 206

    def _simple(self, status: int, headers: dict[str, str], body: bool = True) -> None:
        payload = f"{status}\n".encode() if body and status != 304 else b""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self._last_write()  # the short answer goes out in two small writes, back to back
        self.end_headers()
        self.wfile.write(payload)
