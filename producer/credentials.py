"""Reading what the user gives to connect with (--netrc-file, --load-cookies, --proxy) into tasks.credentials form."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from tasks.credentials import Cookie, Credentials
from tasks.redact import redact_url

from .errors import UsageError


def load(netrc_file: Path | None, cookies_file: Path | None, proxy: str | None = None) -> Credentials:
    """The logins and cookies of both files, and the proxy; UsageError naming the file (and line) on a problem."""
    return Credentials(_logins(netrc_file) if netrc_file else {}, _cookies(cookies_file) if cookies_file else [],
                       _proxy(proxy) if proxy else None)


def _proxy(url: str) -> str:
    """--proxy: http://[user:password@]host[:port] (port 1080 if left out, as curl); shown only without secrets."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise UsageError(f"--proxy {redact_url(url)}: not a valid URL ({exc})") from None
    if parts.scheme.lower() != "http":
        raise UsageError(f"--proxy {redact_url(url)}: only http:// proxies are supported (https:// destinations "
                         "go through them with CONNECT)")
    if not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise UsageError(f"--proxy {redact_url(url)}: give http://[user:password@]host:port, nothing else")
    return parts._replace(path="").geturl()


def _logins(path: Path) -> dict[str, tuple[str, str]]:
    """Machine entries only: a `default` entry would send its login to every host, so it is not used."""
    import netrc  # here, as http.cookiejar below: ~15 ms at every start, for two options seldom given

    try:
        parsed = netrc.netrc(str(path))
    except FileNotFoundError:
        raise UsageError(f"--netrc-file {path}: no such file") from None
    except netrc.NetrcParseError as exc:
        raise UsageError(f"--netrc-file {path}:{exc.lineno}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--netrc-file {path}: cannot read ({exc})") from None
    logins = {host.lower(): (login or "", password or "") for host, (login, _account, password)
              in parsed.hosts.items() if host != "default"}
    if not logins:
        raise UsageError(f"--netrc-file {path}: no `machine` entry (a `default` entry is not used: it would send "
                         "its login to every host)")
    return logins


def _cookies(path: Path) -> list[Cookie]:
    import http.cookiejar

    jar = http.cookiejar.MozillaCookieJar(str(path))
    try:
        jar.load(ignore_discard=True, ignore_expires=True)
    except FileNotFoundError:
        raise UsageError(f"--load-cookies {path}: no such file") from None
    except (http.cookiejar.LoadError, OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--load-cookies {path}: not a Netscape cookies.txt file ({exc})") from None
    cookies = [Cookie(c.domain, c.domain_specified, c.path or "/", c.secure, c.expires, c.name, c.value or "")
               for c in jar]
    bad = next((c.name for c in cookies if any(ch in c.name + c.value for ch in ";\r\n\0")), None)
    if bad is not None:
        raise UsageError(f"--load-cookies {path}: cookie {bad!r} has a ';', line break or NUL in its name or value")
    return cookies
