"""Redaction of secrets in URLs (userinfo, signed-URL and token query parameters) for every display.

Redaction parses: the userinfo is everything before the last `@` of the authority (which ends at the first
`/`, `?`, `#` or character that cannot be in a URL), so a password holding `)`, `'`, `:`, `;` or any other
URL-legal punctuation is masked whole. Only the secret parts change; the rest of the text stays as it was.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

MASK = "****"
_SENSITIVE = re.compile(
    r"(token|secret|signature|sig|key|password|passwd|pwd|auth|credential|session|jwt|x-amz-[a-z-]+|x-goog-[a-z-]+)",
    re.I,
)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*://", re.I)
_PARAM_SEP = re.compile(r"([&;])")  # kept in the split: each separator stays where it was
_URL_END = re.compile(r"""[\s"<>\\^`{|}]""")  # characters a URL cannot hold: where a URL in a text ends
_AUTHORITY_END = re.compile(r"""[/?#\s"<>\\^`{|}]""")


def _sensitive(param: str) -> bool:
    return bool(_SENSITIVE.search(param))


def _mask_params(params: str) -> str:
    """`token=x&page=2` -> `token=****&page=2` (`;` separates parameters too), splitting by hand so that nothing
    else is re-encoded."""
    out = []
    for pair in _PARAM_SEP.split(params):
        key, eq, _value = pair.partition("=")
        out.append(f"{key}={MASK}" if eq and _sensitive(unquote_plus(key)) else pair)
    return "".join(out)


def _mask_rest(rest: str) -> str:
    """Path, query and fragment, with sensitive parameter values masked in the query and the fragment."""
    before, hash_, fragment = rest.partition("#")
    path, q, query = before.partition("?")
    masked = path + (q + _mask_params(query) if q else "")
    return masked + (hash_ + _mask_params(fragment) if hash_ else "")


def _authority_end(text: str, start: int) -> int:
    end = _AUTHORITY_END.search(text, start)
    return end.start() if end else len(text)


def redact_url(url: str) -> str:
    """`https://u:p@h/f?token=x&page=2` -> `https://****@h/f?token=****&page=2`."""
    start = _SCHEME.match(url)
    if not start:
        return _mask_rest(url)
    cut = _authority_end(url, start.end())
    authority = url[start.end() : cut]
    if "@" in authority:
        authority = MASK + "@" + authority.rsplit("@", 1)[1]
    return url[: start.end()] + authority + _mask_rest(url[cut:])


def mask_password(url: str) -> str:
    """A broker URL with its password masked: `redis://:****@host:6379/0` (the user name stays)."""
    start = _SCHEME.match(url)
    if not start:
        return url
    cut = _authority_end(url, start.end())
    userinfo, at, host = url[start.end() : cut].rpartition("@")
    if not at:
        return url
    user, colon, _password = userinfo.partition(":")
    masked = f"{user}:{MASK}" if colon else MASK
    return url[: start.end()] + masked + "@" + host + url[cut:]


def redact_text(text: str) -> str:
    """Redact every URL found inside a free-text message (exception texts quote URLs)."""
    out, pos = [], 0
    for found in _SCHEME.finditer(text):
        if found.start() < pos:
            continue  # inside a URL already redacted
        end = _URL_END.search(text, found.end())
        stop = end.start() if end else len(text)
        out += [text[pos : found.start()], redact_url(text[found.start() : stop])]
        pos = stop
    return "".join(out) + text[pos:]
