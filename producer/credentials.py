"""Reading what the user gives to connect with (--netrc-file, --load-cookies, --proxy) into tasks.credentials form."""

from __future__ import annotations

import re
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


_QUOTED = re.compile(r"""\s*(['"]).*\1\s*$""")  # the token netrc's error quotes: it may be the password


def _logins(path: Path) -> dict[str, tuple[str, str]]:
    """Machine entries only: a `default` entry would send its login to every host, so it is not used."""
    import netrc  # here: ~15 ms at every start, for an option seldom given

    try:
        parsed = netrc.netrc(str(path))
    except FileNotFoundError:
        raise UsageError(f"--netrc-file {path}: no such file") from None
    except netrc.NetrcParseError as exc:
        raise UsageError(f"--netrc-file {path}:{exc.lineno}: {_QUOTED.sub('', exc.msg)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--netrc-file {path}: cannot read ({exc})") from None
    logins = {host.lower(): (login or "", password or "") for host, (login, _account, password)
              in parsed.hosts.items() if host != "default"}
    if not logins:
        raise UsageError(f"--netrc-file {path}: no `machine` entry (a `default` entry is not used: it would send "
                         "its login to every host)")
    return logins


def _cookies(path: Path) -> list[Cookie]:
    """A Netscape cookies.txt (curl's, wget's, a browser export's), read here rather than by http.cookiejar, whose
    errors quote the whole line (the cookie's value) and print a traceback."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"--load-cookies {path}: no such file") from None
    except UnicodeDecodeError:
        raise UsageError(f"--load-cookies {path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"--load-cookies {path}: cannot read ({exc.strerror})") from None
    cookies = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.removeprefix(_HTTP_ONLY)
        if line.strip() and not line.startswith("#"):
            try:
                cookies.append(_cookie(line))
            except ValueError as exc:
                raise UsageError(f"--load-cookies {path}:{number}: {exc}") from None
    return cookies


_HTTP_ONLY = "#HttpOnly_"  # curl's prefix of an HttpOnly cookie's line (otherwise a comment)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 6265 cookie-name (an RFC 9110 token)
# Printable ASCII but ';' (it would start another cookie), no space at either end (requests refuses the header)
_COOKIE_VALUE = re.compile(r"(?:[\x21-\x3a\x3c-\x7e](?:[\x20-\x3a\x3c-\x7e]*[\x21-\x3a\x3c-\x7e])?)?")


def _cookie(line: str) -> Cookie:
    """One cookies.txt line; ValueError naming the problem, never quoting the line (the value is a secret)."""
    fields = line.split("\t")
    if len(fields) != 7:
        raise ValueError("not a Netscape cookies.txt file line (7 tab-separated fields: domain, subdomains, path, "
                         "secure, expiry, name, value)")
    domain, subdomains, where, secure, expires, name, value = fields
    if subdomains.upper() not in ("TRUE", "FALSE") or secure.upper() not in ("TRUE", "FALSE"):
        raise ValueError("not a Netscape cookies.txt file line (the 2nd and 4th fields are TRUE or FALSE)")
    if not domain or not expires.isascii() or not (expires == "" or expires.isdigit()):
        raise ValueError("not a Netscape cookies.txt file line (a domain, and an expiry in epoch seconds)")
    if not _TOKEN.fullmatch(name):
        raise ValueError("a cookie name is a token (letters, digits and !#$%&'*+-.^_`|~ only, no spaces)")
    if not _COOKIE_VALUE.fullmatch(value):
        raise ValueError(f"the value of cookie {name} has a character a cookie cannot hold (a ';', a space at "
                         "either end, a control or non-ASCII character)")
    return Cookie(domain, subdomains.upper() == "TRUE", where or "/", secure.upper() == "TRUE",
                  int(expires) if expires else None, name, value)
