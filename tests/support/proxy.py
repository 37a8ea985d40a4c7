"""A forward HTTP proxy on loopback for tests: records what clients ask it, forwards to loopback origins only."""

from __future__ import annotations

import http.client
import ipaddress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tests.support.origin import Served

HOP_BY_HOP = {"proxy-authorization", "proxy-connection", "connection", "keep-alive"}


@dataclass
class Asked:
    method: str
    target: str  # the absolute URL the client asked for
    headers: dict[str, str]


class Proxy(Served):
    """`with Proxy().start() as p:` -- p.url; p.asked lists the requests it received (with Proxy-Authorization)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, 0
        self.asked: list[Asked] = []
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


class _Handler(BaseHTTPRequestHandler):
    proxy: Proxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence
        pass

    def do_GET(self) -> None:
        self.proxy.asked.append(Asked("GET", self.path, dict(self.headers.items())))
        target = urlsplit(self.path)
        try:
            loopback = ipaddress.ip_address(target.hostname or "").is_loopback
        except ValueError:
            loopback = target.hostname == "localhost"
        if not loopback:  # tests never send traffic off the machine
            return self._answer(403, b"proxy: loopback destinations only\n", {})
        upstream = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Via"] = "1.1 test-proxy"
        upstream.request("GET", target.path + (f"?{target.query}" if target.query else ""), headers=headers)
        response = upstream.getresponse()
        body = response.read()
        passed = {k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}}
        upstream.close()
        self._answer(response.status, body, passed)

    def do_CONNECT(self) -> None:
        self.proxy.asked.append(Asked("CONNECT", self.path, dict(self.headers.items())))
        self._answer(501, b"", {})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
