"""Reading a URL list: one pass checks every line, names each URL and spools the entries to a temp file.

Nothing is enqueued unless every line is good; the bad ones are all reported (up to MAX_REPORTED).
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from tasks.message import Entry
from tasks.naming import NameAllocator

from .errors import UsageError

MAX_URL = 8192
MAX_REPORTED = 20
_DIGEST = re.compile(r"sha256=([0-9a-fA-F]*)")


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
    """The list as a file (stdin is copied to a temp file); True if that file is temporary."""
    if path == "-":
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as tmp:
            shutil.copyfileobj(sys.stdin, tmp)
        return Path(tmp.name), True
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{path}: no such file (give a text file with one URL per line, or - for stdin)")
    return p, False


class Spool:
    """The checked entries of a list, in a temp file: read any number of times without parsing or naming again."""

    def __init__(self) -> None:
        self._fh = tempfile.TemporaryFile("w+", encoding="utf-8", newline="\n")  # noqa: SIM115 - see __exit__
        self.count = 0

    def add(self, e: Entry) -> None:
        """Write an entry down (names have no control characters, URLs no whitespace)."""
        self._fh.write(f"{e.index}\t{e.sha256 or ''}\t{e.name}\t{e.url}\n")
        self.count += 1

    def replay(self) -> Iterator[Entry]:
        self._fh.seek(0)
        for line in self._fh:
            index, digest, name, url = line.rstrip("\n").split("\t", 3)
            yield Entry(int(index), url, name, digest or None)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def read(path: Path, label: str) -> Spool:
    """Check every line and spool the distinct URLs with collision-free names; UsageError listing bad lines."""
    spool = Spool()
    try:
        bad = _fill(spool, path, label)
        if bad:
            shown = bad[:MAX_REPORTED]
            if len(bad) > MAX_REPORTED:
                shown.append(f"... and {len(bad) - MAX_REPORTED} more")
            if len(bad) > 1:
                shown.append("nothing was enqueued: fix the lines above")
            raise UsageError("\nerror: ".join(shown))
        if not spool.count:
            raise UsageError(f"{label}: no URLs in the list")
    except BaseException:
        spool.__exit__()
        raise
    return spool


def _fill(spool: Spool, path: Path, label: str) -> list[str]:
    """One pass over the file: good lines into the spool (while there is no bad one), bad lines returned."""
    names, seen, bad = NameAllocator(), set[str](), list[str]()
    try:
        with open(path, encoding="utf-8") as fh:
            for number, line in _lines(fh):
                try:
                    url, digest = check_line(line)
                except ValueError as exc:
                    bad.append(f"{label}:{number}: {exc}")
                    continue
                if not bad and url not in seen:
                    seen.add(url)
                    spool.add(Entry(spool.count, url, names.allocate(url), digest))
    except UnicodeDecodeError as exc:
        raise UsageError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{label}: cannot read ({exc.strerror})") from None
    return bad
