"""Safe, deterministic file names for URLs: one pure function decides, the producer and the task both use it."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from urllib.parse import unquote, urlsplit

from .errors import UnsafeName

MAX_NAME_BYTES = 180  # leaves room for the ".<name>.<id>.part" temp name within NAME_MAX (255)
DEFAULT_NAME = "index.html"
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f/\\<>:"|?*]')
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}


def sanitize(raw: str) -> str:
    """Turn any string into one safe path component: no separators, controls, dot-names or device names."""
    name = unicodedata.normalize("NFC", raw)
    name = _UNSAFE.sub("_", name).strip(" ")
    name = re.sub(r"^\.+", lambda m: "_" * len(m.group()), name)  # no hidden files, no "." or ".."
    name = name.rstrip(". ")  # Windows drops trailing dots and spaces
    if not name:
        return DEFAULT_NAME
    stem, dot, ext = name.partition(".")
    if stem.lower() in _WINDOWS_DEVICES:
        name = "_" + name
    return _truncate(name)


def _truncate(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """Cut to `limit` UTF-8 bytes, keeping a short extension, never splitting a character."""
    if len(name.encode()) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16:
        stem, ext = name, ""
    tail = f".{ext}" if ext else ""
    budget = limit - len(tail.encode())
    cut = stem.encode()[:budget].decode("utf-8", "ignore")
    return cut + tail


def name_for(url: str) -> str:
    """The file name a URL gets by itself: its last path segment, percent-decoded and sanitised."""
    path = urlsplit(url).path
    segment = path.rsplit("/", 1)[-1]
    return sanitize(unquote(segment, errors="replace"))


def with_hash(name: str, url: str) -> str:
    """`f.pdf` -> `f-1a2b3c4d.pdf`: a name made unique by a short hash of the whole URL."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:8]
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    stem = _truncate(stem, MAX_NAME_BYTES - 9 - len(ext.encode()) - 1)
    return f"{stem}-{digest}.{ext}" if ext else f"{stem}-{digest}"


def collision_key(name: str) -> str:
    """Names equal under case folding and Unicode normalisation collide on some file systems."""
    return unicodedata.normalize("NFKC", name).casefold()


class NameAllocator:
    """Gives each distinct URL of a job a distinct name; the first URL keeps the plain name."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def allocate(self, url: str, preferred: str | None = None) -> str:
        name = sanitize(preferred) if preferred else name_for(url)
        if collision_key(name) in self._taken:
            name = with_hash(name, url)
        self._taken.add(collision_key(name))
        return name


def check_component(name: str) -> str:
    """Re-check, in the worker, that a name from a message is one safe component (the producer may be old)."""
    if not name or sanitize(name) != name:
        raise UnsafeName(f"unsafe file name {name!r}")
    return name


def parse_content_disposition(value: str) -> str | None:
    """The filename of a Content-Disposition header (RFC 6266, `filename*` preferred), or None."""
    star = re.search(r"filename\*\s*=\s*([^;]+)", value, re.I)
    if star:
        charset, _, rest = star.group(1).strip().strip('"').partition("''")
        if rest:
            try:
                return unquote(rest, encoding=charset or "utf-8", errors="replace")
            except LookupError:
                return unquote(rest, errors="replace")
    plain = re.search(r'filename\s*=\s*("((?:[^"\\]|\\.)*)"|[^;]+)', value, re.I)
    if not plain:
        return None
    if plain.group(2) is not None:
        return re.sub(r"\\(.)", r"\1", plain.group(2))
    return plain.group(1).strip()


def disposition_name(value: str) -> str | None:
    """Only the final path component of a Content-Disposition filename, sanitised; None if absent."""
    raw = parse_content_disposition(value)
    if raw is None:
        return None
    last = re.split(r"[/\\]", raw)[-1]
    return sanitize(last)
