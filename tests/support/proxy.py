"""A forward HTTP proxy on loopback for tests: records what clients ask it, forwards plain requests and tunnels
CONNECT (https) to loopback destinations only."""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from bench.realparts.origin import Served

HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}
LOOPBACK_ONLY = b"proxy: loopback destinations only\n"


@dataclass
class Asked:
    method: str
    target: str  # the absolute URL the client asked for (GET), or HOST:PORT (CONNECT)
    headers: dict[str, str]


@dataclass
class Tunnel:
    """One CONNECT tunnel and every byte it relayed each way (a test can check the proxy saw only TLS)."""

    target: str  # HOST:PORT as the client asked
    upstream: tuple[str, int]  # the proxy's end of its connection to the destination: the origin's client address
    to_origin: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class Proxy(Served):
    """`with Proxy().start() as p:` -- p.url; p.asked lists the requests it received (with Proxy-Authorization),
    p.tunnels the CONNECT tunnels it opened.

    `hosts`: names this proxy resolves itself, as a real proxy's DNS would (`{"files.test": "127.0.0.1"}`); a name
    not listed is never looked up. Destinations that are not on loopback are refused with 403: tests never send
    traffic off the machine."""

    def __init__(self, host: str = "127.0.0.1", hosts: dict[str, str] | None = None) -> None:
        self.host, self.port = host, 0
        self.hosts = {name.lower(): address for name, address in (hosts or {}).items()}
        self.asked: list[Asked] = []
        self.tunnels: list[Tunnel] = []
        self._sockets: list[socket.socket] = []  # both ends of every open tunnel, closed by stop()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Proxy:
        handler = type("Handler", (_Handler,), {"proxy": self})
        server = ThreadingHTTPServer((self.host, 0), handler)
        server.daemon_threads = True
        self._serve(server)
        return self

    def stop(self) -> None:
        super().stop()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._sockets.clear()

    def loopback_address(self, host: str) -> str | None:
        """The address `host` stands for if it is on loopback, else None (a listed name, an address, localhost)."""
        host = host.strip("[]").lower()
        address = self.hosts.get(host, "127.0.0.1" if host == "localhost" else host)
        try:
            return address if ipaddress.ip_address(address).is_loopback else None
        except ValueError:
            return None


class _Handler(BaseHTTPRequestHandler):
    proxy: Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence
        pass

    def do_GET(self) -> None:
        self.proxy.asked.append(Asked("GET", self.path, dict(self.headers.items())))
        target = urlsplit(self.path)
        address = self.proxy.loopback_address(target.hostname or "")
        if address is None:  # tests never send traffic off the machine
            return self._answer(403, LOOPBACK_ONLY, {})
        upstream = http.client.HTTPConnection(address, target.port or 80, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Via"] = "1.1 test-proxy"
        upstream.request("GET", target.path + (f"?{target.query}" if target.query else ""), headers=headers)
        response = upstream.getresponse()
        body = response.read()
        passed = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        upstream.close()
        self._answer(response.status, body, passed)

    def do_CONNECT(self) -> None:
        """Open a tunnel to HOST:PORT and relay bytes both ways until either side closes."""
        self.proxy.asked.append(Asked("CONNECT", self.path, dict(self.headers.items())))
        self.close_connection = True  # after the tunnel, nothing more is read as HTTP on this connection
        host, _, port = self.path.rpartition(":")
        address = self.proxy.loopback_address(host) if port.isdecimal() and int(port) <= 65535 else None
        if address is None:
            return self._answer(403, LOOPBACK_ONLY, {})
        try:
            upstream = socket.create_connection((address, int(port)), timeout=10)
        except OSError:
            return self._answer(502, b"proxy: destination unreachable\n", {})
        upstream.settimeout(None)
        tunnel = Tunnel(self.path, upstream.getsockname()[:2])
        self.proxy.tunnels.append(tunnel)
        self.proxy._sockets += [upstream, self.connection]
        self.send_response(200, "Connection established")
        self.end_headers()

        def close_both() -> None:
            for sock in (upstream, self.connection):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=_relay, args=(upstream.recv, self.connection.sendall, tunnel.to_client,
                                                     close_both), daemon=True)
        back.start()
        # rfile: the client's bytes, including any it sent right behind the CONNECT request (already buffered)
        _relay(self.rfile.read1, upstream.sendall, tunnel.to_origin, close_both)
        back.join(10)
        upstream.close()

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _relay(read: Callable[[int], bytes], write: Callable[[bytes], Any], seen: bytearray,
           done: Callable[[], None]) -> None:
    """Copy `read` to `write` (recording it in `seen`) until end of stream or an error, then close the tunnel."""
    with contextlib.suppress(OSError, ValueError):
        while data := read(65536):
            seen.extend(data)
            write(data)
    done()
