"""Credentials a job brings: netrc logins per host, Netscape cookies per domain, and its --proxy.

They are secrets: kept in the job's ledger (like secret headers), never in a task message. The worker adds them
hop by hop (`headers_for`), so each request, a redirect's included, gets only what matches its own host.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Cookie:
    """One line of a Netscape cookies.txt."""

    domain: str
    subdomains: bool  # the file's second column (TRUE: sent to sub-domains too)
    path: str
    secure: bool
    expires: int | None  # epoch seconds; None or 0: a session cookie
    name: str
    value: str

    def matches(self, scheme: str, host: str, path: str, now: float) -> bool:
        """As a browser decides (RFC 6265 5.4): domain (or a sub-domain if allowed), path prefix, secure, expiry."""
        domain = self.domain.lstrip(".").lower()
        if host != domain and not (self.subdomains and host.endswith("." + domain)):
            return False
        if self.secure and scheme != "https":
            return False
        if self.expires and self.expires < now:
            return False
        prefix = self.path or "/"
        return path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/")


@dataclass
class Credentials:
    logins: dict[str, tuple[str, str]] = field(default_factory=dict)  # host -> (login, password), from netrc
    cookies: list[Cookie] = field(default_factory=list)
    proxy: str | None = None  # --proxy http://[user:password@]host:port (its password is a secret too)

    def __bool__(self) -> bool:
        return bool(self.logins or self.cookies or self.proxy)

    def headers_for(self, url: str) -> dict[str, str]:
        """Authorization (netrc, unless the URL has its own userinfo) and Cookie for this URL's host only."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        out = {}
        login = self.logins.get(host)
        if login and not parts.username:
            out["Authorization"] = "Basic " + base64.b64encode(f"{login[0]}:{login[1]}".encode()).decode()
        now = time.time()
        jar = [c for c in self.cookies if c.matches(parts.scheme.lower(), host, parts.path or "/", now)]
        if jar:
            out["Cookie"] = "; ".join(f"{c.name}={c.value}" for c in jar)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"logins": {h: list(v) for h, v in self.logins.items()}, "cookies": [asdict(c) for c in self.cookies],
                "proxy": self.proxy}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Credentials:
        data = data or {}
        return cls({h: (v[0], v[1]) for h, v in (data.get("logins") or {}).items()},
                   [Cookie(**c) for c in data.get("cookies") or []], data.get("proxy"))
