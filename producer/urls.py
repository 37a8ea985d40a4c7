"""Reading and validating a URL list: every line is checked before anything is enqueued."""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from tasks.naming import NameAllocator

from .errors import UsageError

MAX_URL = 8192
_DIGEST = re.compile(r"sha256=([0-9a-fA-F]*)")


@dataclass(frozen=True)
class Entry:
    index: int
    url: str
    name: str
    sha256: str | None


def check_line(line: str) -> tuple[str, str | None]:
    """(url, sha256) of one non-blank, non-comment line; ValueError with the reason otherwise."""
    url, *rest = line.split()
    if len(url) > MAX_URL:
        raise ValueError(f"URL longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {url!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {url!r}")
    digest = None
    for token in rest:
        match = _DIGEST.fullmatch(token)
        if not match:
            raise ValueError(f"unexpected text after the URL: {token!r} (only sha256=<64 hex digits> may follow)")
        if len(match.group(1)) != 64:
            raise ValueError(f"invalid digest {token!r}: sha256= needs 64 hex digits")
        digest = match.group(1).lower()
    return url, digest


def _lines(fh: IO[str]) -> Iterator[tuple[int, str]]:
    for number, raw in enumerate(fh, 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def open_list(path: str) -> tuple[Path, bool]:
    """The list as a re-readable file (stdin is copied to a temp file); True if that file is temporary."""
    if path == "-":
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as tmp:
            shutil.copyfileobj(sys.stdin, tmp)
        return Path(tmp.name), True
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file (give a text file with one URL per line, or - for stdin)")
    return p, False


def validate(path: Path, label: str) -> int:
    """Check every line; raise UsageError naming the first bad line. Returns the number of distinct URLs."""
    seen: set[str] = set()
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in _lines(fh):
                try:
                    url, _ = check_line(line)
                except ValueError as exc:
                    raise UsageError(f"{label}:{number}: {exc}") from None
                seen.add(url)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{label}: cannot read ({exc.strerror})") from None
    if not seen:
        raise UsageError(f"{label}: no URLs in the list")
    return len(seen)


def entries(path: Path) -> Iterator[Entry]:
    """The validated list as entries: duplicates dropped, each URL with its own collision-free name."""
    names = NameAllocator()
    seen: set[str] = set()
    index = 0
    with open(path, encoding="utf-8") as fh:
        for _, line in _lines(fh):
            url, digest = check_line(line)
            if url in seen:
                continue
            seen.add(url)
            yield Entry(index, url, names.allocate(url), digest)
            index += 1


class Spool:
    """The entries of one streaming pass, kept in a temp file so a second pass needs no parsing or naming."""

    def __init__(self) -> None:
        self._fh = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n")  # noqa: SIM115 - see __exit__

    def recording(self, items: Iterator[Entry]) -> Iterator[Entry]:
        """Pass `items` through, writing each down (names have no control characters, URLs no whitespace)."""
        for e in items:
            self._fh.write(f"{e.index}\t{e.sha256 or ''}\t{e.name}\t{e.url}\n")
            yield e

    def replay(self) -> Iterator[Entry]:
        self._fh.seek(0)
        for line in self._fh:
            index, digest, name, url = line.rstrip("\n").split("\t", 3)
            yield Entry(int(index), url, name, digest or None)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()
