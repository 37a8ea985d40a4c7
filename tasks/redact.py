"""Redaction of secrets in URLs (userinfo, signed-URL and token query parameters) for every display."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "****"
_SENSITIVE = re.compile(
    r"(token|secret|signature|sig|key|password|passwd|pwd|auth|credential|session|x-amz-[a-z-]+|x-goog-[a-z-]+)",
    re.I,
)


def _sensitive(param: str) -> bool:
    return bool(_SENSITIVE.search(param))


def redact_url(url: str) -> str:
    """`https://u:p@h/f?token=x&page=2` -> `https://****@h/f?token=****&page=2`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_sensitive(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _sensitive(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_password(url: str) -> str:
    """A broker URL with its password masked: `redis://:****@host:6379/0`."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1" + MASK + "@", url)


def redact_text(text: str) -> str:
    """Redact every URL found inside a free-text message (exception texts quote URLs)."""
    return re.sub(r"[a-z][a-z0-9+.-]*://[^\s'\"<>)]+", lambda m: redact_url(m.group()), text, flags=re.I)
