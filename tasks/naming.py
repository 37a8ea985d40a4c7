"""Safe, deterministic file names for URLs: one pure function decides, the producer and the task both use it."""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
from collections.abc import Callable, Iterator
from urllib.parse import unquote, urlsplit

from .errors import UnsafeName

MAX_NAME_BYTES = 180  # leaves room for the ".<name>.<id>.part" temp name within NAME_MAX (255)
DEFAULT_NAME = "index.html"
_MAX_EXT_BYTES = 16
# Controls, separators, Windows-reserved characters and bidi formatting marks (U+202E shows `invoice\u202efdp.exe`
# as `invoiceexe.pdf`)
_UNSAFE = re.compile(r'[\x00-\x1f\x7f-\x9f/\\<>:"|?*\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]')
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}


def sanitize(raw: str) -> str:
    """Turn any string into one safe path component: no separators, controls, dot-names or device names.

    The result is a fixed point (`sanitize(sanitize(x)) == sanitize(x)`), which is exactly what the worker's
    `check_component` accepts: the producer can only make names the worker takes.
    """
    name = unicodedata.normalize("NFC", raw)
    for _ in range(4):  # each pass only shortens, or prefixes a device name once: stable after a few
        again = _sanitize_once(name)
        if again == name:
            break
        name = again
    return name


def _sanitize_once(raw: str) -> str:
    name = unicodedata.normalize("NFC", raw)
    name = _UNSAFE.sub("_", name).strip(" ")
    name = re.sub(r"^\.+", lambda m: "_" * len(m.group()), name)  # no hidden files, no "." or ".."
    name = name.rstrip(". ")  # Windows drops trailing dots and spaces
    if not name:
        return DEFAULT_NAME
    stem = name.partition(".")[0]
    if stem.lower() in _WINDOWS_DEVICES:
        name = "_" + name
    return _truncate(name).rstrip(". ")  # a cut can end in a space or a dot again


def _split_ext(name: str) -> tuple[str, str]:
    """(stem, ext) where ext is a short extension (at most 16 bytes) or empty."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > _MAX_EXT_BYTES:
        return name, ""
    return stem, ext


def _truncate(name: str, limit: int = MAX_NAME_BYTES) -> str:
    """Cut to `limit` UTF-8 bytes, keeping a short extension, never splitting a character."""
    if len(name.encode()) <= limit:
        return name
    stem, ext = _split_ext(name)
    tail = f".{ext}" if ext else ""
    budget = max(0, limit - len(tail.encode()))
    cut = stem.encode()[:budget].decode("utf-8", "ignore")
    return cut + tail


def name_for(url: str) -> str:
    """The file name a URL gets by itself: its last path segment, percent-decoded and sanitised."""
    path = urlsplit(url).path
    segment = path.rsplit("/", 1)[-1]
    return sanitize(unquote(segment, errors="replace"))


def with_hash(name: str, seed: str) -> str:
    """`f.pdf` -> `f-1a2b3c4d.pdf`: a name made distinct by a short hash of `seed` (the whole URL)."""
    digest = hashlib.sha256(seed.encode()).hexdigest()[:8]
    stem, ext = _split_ext(name)
    tail = f".{ext}" if ext else ""
    stem = stem.encode()[: MAX_NAME_BYTES - 9 - len(tail.encode())].decode("utf-8", "ignore")
    return sanitize(f"{stem}-{digest}{tail}")


def candidates(name: str, url: str) -> Iterator[str]:
    """The names a URL may take, in order: its own, then hashed ones. Endless, so a caller can always skip a
    name that is taken (a crafted list can hold another URL's hashed name as a plain name)."""
    yield name
    yield with_hash(name, url)
    for n in itertools.count(2):
        yield with_hash(name, f"{url}#{n}")


def collision_key(name: str) -> str:
    """Names equal under case folding and Unicode normalisation collide on some file systems."""
    return unicodedata.normalize("NFKC", name).casefold()


class NameAllocator:
    """Gives each distinct URL of a job a distinct name; the first URL keeps the plain name."""

    def __init__(self, claim: Callable[[str], bool] | None = None) -> None:
        """`claim(key)`: True if no name with this collision key was given yet (and now it is); by default a set."""
        self._taken: set[str] = set()
        self._claim = claim or self._claim_in_set

    def _claim_in_set(self, key: str) -> bool:
        if key in self._taken:
            return False
        self._taken.add(key)
        return True

    def allocate(self, url: str, preferred: str | None = None) -> str:
        """The first of the URL's candidate names that no earlier URL of the job holds (under case folding)."""
        for name in candidates(sanitize(preferred) if preferred else name_for(url), url):
            if self._claim(collision_key(name)):
                return name
        raise AssertionError("unreachable: candidates() never ends")


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
            except (LookupError, ValueError):  # unknown charset, or a codec without "replace" (idna)
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
