"""Reading a URL list: one pass checks every line, names each URL and spools the entries to a temp file.

Two formats, mixed freely: one URL per line (optionally followed by sha256=<hex>), and aria2c's input file, where
a URL line is followed by indented `key=value` lines (out, dir, header, checksum, user-agent, referer,
continue) for that URL; other aria2 options are a warning each.
Nothing is enqueued unless every line is good; the bad ones are all reported (up to MAX_REPORTED).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from tasks.errors import UnsafeName
from tasks.message import Entry, is_owned_header
from tasks.naming import NameAllocator, candidates, check_component, collision_key, sanitize
from tasks.redact import redact_url

from .errors import UsageError
from .seen import Seen

MAX_URL = 8192
MAX_LINE = 64 << 10  # characters of a list line: a URL and its digest fit many times; a runaway line does not
MAX_HEADER = 8 << 10  # bytes of one header (name and value): what common servers accept
MAX_REPORTED = 20
_DIGEST = re.compile(r"sha256=([0-9a-fA-F]*)")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # an indented line that starts so is a URL line, not key=value
ARIA2_OPTIONS = ("out", "dir", "header", "checksum", "user-agent", "referer", "continue")
# aria2c input-file options fleetfetch has no use for, or takes for a whole job only (on its command line): each
# is one warning, not an error, so a real aria2 list runs. `continue` needs no mapping: partial files are continued.
ARIA2_IGNORED = frozenset((
    "all-proxy", "all-proxy-passwd", "all-proxy-user", "allow-overwrite", "allow-piece-length-change",
    "always-resume", "async-dns", "auto-file-renaming", "check-integrity", "conditional-get", "connect-timeout",
    "dry-run", "enable-http-keep-alive", "enable-http-pipelining", "enable-mmap", "file-allocation", "ftp-passwd",
    "ftp-pasv", "ftp-proxy", "ftp-proxy-passwd", "ftp-proxy-user", "ftp-reuse-connection", "ftp-type", "ftp-user",
    "gid", "hash-check-only", "http-accept-gzip", "http-auth-challenge", "http-no-cache", "http-passwd", "http-proxy",
    "http-proxy-passwd", "http-proxy-user", "http-user", "https-proxy", "https-proxy-passwd", "https-proxy-user",
    "index-out", "lowest-speed-limit", "max-connection-per-server", "max-download-limit", "max-file-not-found",
    "max-mmap-limit", "max-resume-failure-tries", "max-tries", "metalink-base-uri", "min-split-size", "netrc-path",
    "no-file-allocation-limit", "no-netrc", "no-proxy", "parameterized-uri", "pause", "pause-metadata",
    "piece-length", "proxy-method", "realtime-chunk-checksum", "remote-time", "remove-control-file", "retry-wait",
    "reuse-uri", "rpc-save-upload-metadata", "select-file", "split", "ssh-host-key-md", "stream-piece-selector",
    "timeout", "uri-selector", "use-head",
))


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value` -> (name, value); ValueError naming the problem (never the value: it may be a secret)."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name:
        raise ValueError("a header is 'Name: value' (no ':' after a name)")
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError("a header name is letters, digits and -_.!#$%&'*+^`|~ only")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"the value of header {name} has a line break or NUL")
    if is_owned_header(name):
        raise ValueError(f"header {name} is fleetfetch's own (it decides Range, If-*, framing and Host itself): "
                         "leave it out")
    try:
        size = len(name) + len(value.encode("latin-1")) + 2
    except UnicodeEncodeError:
        raise ValueError(f"the value of header {name} is not Latin-1 text (percent-encode it)") from None
    if size > MAX_HEADER:
        raise ValueError(f"header {name} is longer than {MAX_HEADER} bytes")
    return name, value


def check_subdir(value: str, label: str = "dir=") -> str:
    """A relative sub-directory whose every component the workers accept; ValueError naming `label` otherwise."""
    p = Path(value)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"{label}{value!r}: give a relative sub-directory of the download directory (no /, no ..)")
    for part in p.parts:
        try:
            check_component(part)
        except UnsafeName:
            raise ValueError(f"{label}{value!r}: {part!r} is not a name the workers accept (no hidden, reserved or "
                             "special-character names)") from None
    return p.as_posix()


def _out(value: str) -> str:
    """out=: one file name the workers accept."""
    try:
        return check_component(value)
    except UnsafeName:
        hint = "; put directories in dir=" if "/" in value else ""
        raise ValueError(f"out={value!r} is not a file name the workers accept (no /, hidden, reserved or "
                         f"special-character names){hint}") from None


def _once(own: dict[str, Any], key: str, value: str, label: str) -> None:
    """Set a URL's option that has one value; a second, different one is an error (not "the last one wins")."""
    if own.get(key, value) != value:
        raise ValueError(f"{label} is given twice for this URL with different values: keep one")
    own[key] = value


def parse_option(own: dict[str, Any], line: str) -> str | None:
    """One indented aria2 `key=value` line into the URL's own options; ValueError naming the problem. Returns the
    key of an aria2 option fleetfetch ignores (for one warning), else None."""
    key, eq, value = line.partition("=")
    key, value = key.strip(), value.strip()
    if not eq:
        raise ValueError("an option line is key=value (this one has no '='; a URL line starts with http:// or https://)")
    if key == "out":
        _once(own, "name", _out(value), "out=")
    elif key == "dir":
        own["subdir"] = check_subdir(value)
    elif key == "header":
        own.setdefault("headers", []).append(list(parse_header(value)))
    elif key == "user-agent":
        parse_header(f"User-Agent: {value}")
        own["user_agent"] = value
    elif key == "checksum":
        algorithm, _, digest = value.partition("=")
        if algorithm.lower() not in ("sha-256", "sha256"):
            raise ValueError(f"checksum={algorithm}=...: only sha-256 is supported (checksum=sha-256=<64 hex digits>)")
        if not _HEX64.fullmatch(digest):
            raise ValueError("invalid checksum: sha-256= needs 64 hex digits")
        _once(own, "sha256", digest.lower(), "checksum= (or sha256=)")
    elif key == "referer":
        own.setdefault("headers", []).append(list(parse_header(f"Referer: {value}")))
    elif key in ARIA2_IGNORED:
        return key
    elif key != "continue":
        raise ValueError(f"unknown option {key!r} (a list may give {', '.join(ARIA2_OPTIONS)})")
    return None


def check_line(line: str) -> tuple[str, str | None]:
    """(url, sha256) of one non-blank, non-comment line; ValueError with the reason otherwise."""
    url, *rest = line.split()
    if len(url) > MAX_URL:
        raise ValueError(f"URL longer than {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {redact_url(url)!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {redact_url(url)!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {redact_url(url)!r}")
    digest = None
    for token in rest:
        match = _DIGEST.fullmatch(token)
        if not match and "://" in token:
            raise ValueError("several URLs on one line (aria2's mirrors of one file) are not supported: give each "
                             "URL its own line")
        if not match:
            shown = token.partition("=")[0] + "=..." if "=" in token else token  # a key=value's value may be a secret
            raise ValueError(f"unexpected text after the URL: {shown!r} (only sha256=<64 hex digits> may follow)")
        if len(match.group(1)) != 64:
            raise ValueError(f"invalid digest {token!r}: sha256= needs 64 hex digits")
        digest = match.group(1).lower()
    return url, digest


def _lines(fh: IO[str]) -> Iterator[tuple[int, str, bool]]:
    """(line number, text, indented: an aria2 option line) of each line that is not blank or a comment."""
    for number, raw in enumerate(fh, 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line, raw[:1] in (" ", "\t") and not _SCHEME.match(line)


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
        own = json.dumps(e.opts, separators=(",", ":")) if e.opts else ""  # JSON escapes tabs and newlines
        self._fh.write(f"{e.index}\t{e.sha256 or ''}\t{own}\t{e.name}\t{e.url}\n")
        self.count += 1

    def replay(self) -> Iterator[Entry]:
        self._fh.seek(0)
        for line in self._fh:
            index, digest, own, name, url = line.rstrip("\n").split("\t", 4)
            yield Entry(int(index), url, name, digest or None, json.loads(own) if own else {})

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def read(path: Path, label: str, force_directories: bool = False) -> Spool:
    """Check every line and spool the distinct URLs with collision-free names; UsageError listing bad lines."""
    spool = Spool()
    try:
        bad = _fill(spool, path, label, force_directories)
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


class _Filler:
    """The URL being read (its option lines may follow) and what the job has so far."""

    def __init__(self, spool: Spool, force_directories: bool = False) -> None:
        self.spool, self.bad = spool, list[str]()
        self.force_directories = force_directories
        self.names: dict[str, NameAllocator] = {}  # one per directory: names are unique where they land
        self.seen = Seen()  # URLs and names so far, in bounded memory
        self.url: str | None = None
        self.own: dict[str, Any] = {}
        self.ignored: dict[str, list[int]] = {}  # aria2 option -> the lines that gave it

    def start(self, url: str | None, digest: str | None) -> None:
        self.finish()
        self.url, self.own = url, ({"sha256": digest} if digest else {})

    def finish(self) -> None:
        url, own = self.url, self.own
        self.url, self.own = None, {}
        if url is None or self.bad or not self.seen.claim(f"u\0{url}"):
            return
        name, digest = own.pop("name", None), own.pop("sha256", None)
        if self.force_directories:
            own["subdir"] = "/".join(p for p in (own.get("subdir", ""), url_directories(url)) if p)
        subdir = own["subdir"] = self._directories(own.get("subdir", ""))
        if not subdir:
            own.pop("subdir")
        if subdir not in self.names:
            self.names[subdir] = NameAllocator(functools.partial(self._claim_name, subdir))
        names = self.names[subdir]
        self.spool.add(Entry(self.spool.count, url, names.allocate(url, name), digest, own))


    def _claim_name(self, subdir: str, key: str) -> bool:
        """A file's name: free unless a file or a directory of the job has it there."""
        return f"d\0{subdir}\0{key}" not in self.seen and self.seen.claim(f"n\0{subdir}\0{key}")

    def _directories(self, subdir: str) -> str:
        """`subdir` with each directory that would have a file's name (`/docs` and `/docs/a.pdf` with -x, or a
        file `forms` beside `dir=forms`) given a name of its own: the first of its candidates (its name, then
        hashed by its path) that no file of the job has. The first to come keeps the plain name."""
        parent = ""
        for part in subdir.split("/") if subdir else []:
            for name in candidates(part, f"{parent}/{part}/" if parent else f"{part}/"):  # seeded by its path
                key = collision_key(name)
                if f"d\0{parent}\0{key}" in self.seen or f"n\0{parent}\0{key}" not in self.seen:
                    self.seen.claim(f"d\0{parent}\0{key}")
                    break
            parent = f"{parent}/{name}" if parent else name
        return parent


def url_directories(url: str) -> str:
    """-x/--force-directories (wget's): `http://h:81/a/b/f.pdf` -> `h_81/a/b`, each component sanitised."""
    parts = urlsplit(url)
    segments = [parts.netloc.rsplit("@", 1)[-1].lower(), *parts.path.split("/")[:-1]]
    return "/".join(sanitize(unquote(seg, errors="replace")) for seg in segments if seg)


def _fill(spool: Spool, path: Path, label: str, force_directories: bool = False) -> list[str]:
    """One pass over the file: good lines into the spool (while there is no bad one), bad lines returned."""
    state, url_line = _Filler(spool, force_directories), False
    try:
        with state.seen, open(path, encoding="utf-8") as fh:
            for number, line, indented in _lines(fh):
                try:
                    if len(line) > MAX_LINE:
                        raise ValueError(f"line longer than {MAX_LINE} characters")
                    if indented and url_line:
                        ignored = parse_option(state.own, line)
                        if ignored:
                            state.ignored.setdefault(ignored, []).append(number)
                        continue
                    if indented:
                        raise ValueError(f"option line {line.split('=', 1)[0]!r}= has no URL line before it")
                    url_line = True
                    state.start(None, None)  # a bad URL line's options are still checked, then dropped
                    state.start(*check_line(line))
                except ValueError as exc:
                    state.bad.append(f"{label}:{number}: {exc}")
            state.finish()
        if not state.bad:
            for key, numbers in state.ignored.items():
                more = f" (and on {len(numbers) - 1} more lines)" if len(numbers) > 1 else ""
                print(f"warning: {label}:{numbers[0]}: aria2 option {key}= is not one fleetfetch takes in a list: "
                      f"ignored{more}", file=sys.stderr)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{label}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{label}: cannot read ({exc.strerror})") from None
    return state.bad
