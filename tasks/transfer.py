"""One download attempt: conditional/ranged request, stream into the temp file, verify, rename into place."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from . import fetch, labels, partial, segments, storage
from .credentials import Credentials
from .errors import Busy, CutShort, PermanentError, TransientError
from .naming import candidates, check_component, disposition_name
from .pace import Pace

_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")
_DECIMAL = re.compile(r"[0-9]{1,19}")


@dataclass
class Request:
    """What one task was asked to do (built from the message's small JSON arguments)."""

    url: str
    name: str
    subdir: str = ""
    sha256: str | None = None
    force: bool = False
    max_size: int = 0
    resume: dict[str, str] | None = None  # validators of a kept partial file, set by a failed attempt
    content_disposition: bool = False  # name the file from the server's Content-Disposition (opt-in)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request (User-Agent, --header)
    limit_rate: int = 0  # bytes per second of this download; 0: unlimited
    credentials: Credentials | None = None  # netrc logins, cookies (added per host by fetch) and --proxy
    replace: bool = True  # False (a task without a job): an existing file is replaced only if it is this URL's own
    segments: segments.Config | None = None  # big files in several ranges at once (--split); None: one stream


@dataclass
class Outcome:
    """The facts of a finished attempt; the task turns them into the record."""

    status: str
    path: str
    bytes: int
    sha256: str
    http_status: int
    final_url: str
    headers: dict[str, str] = field(default_factory=dict)


def _validators_of(response: requests.Response) -> dict[str, str]:
    return {k: response.headers[h] for k, h in (("etag", "etag"), ("last_modified", "last-modified"))
            if h in response.headers}


def _length(response: requests.Response) -> int | None:
    length = response.headers.get("content-length", "").strip()
    return int(length) if _DECIMAL.fullmatch(length) else None


def _resume_headers(part: storage.PartFile, resume: dict[str, str] | None) -> dict[str, str]:
    """Range + If-Range to continue the partial file an earlier attempt recorded; empty (and the file
    emptied) otherwise."""
    validator = (resume or {}).get("etag") or (resume or {}).get("last_modified")
    if validator and part.keep_prefix((resume or {}).get("part")) > 0:
        return {"Range": f"bytes={part.size}-", "If-Range": validator}
    part.restart()
    return {}


def _range_ok(response: requests.Response, offset: int) -> bool:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    return match is not None and int(match.group(1)) == offset


def attempt(req: Request, root: Path, limits: fetch.Limits, *, deadline: float, fsync: bool,
            on_chunk: Callable[[int, int | None], None] | None = None) -> Outcome:
    """Run one attempt. Raises TransientError (with `.resume` when the partial file is worth keeping).
    `on_chunk(bytes so far, expected size or None)` runs after each chunk written (it may raise to stop the
    download: a cancelled job)."""
    with storage.TargetDir(root, req.subdir) as where:
        return _attempt(req, where, limits, deadline, fsync, on_chunk)


def _attempt(req: Request, where: storage.TargetDir, limits: fetch.Limits, deadline: float, fsync: bool,
             on_chunk: Callable[[int, int | None], None] | None) -> Outcome:
    check_component(req.name)
    where.check_meta()
    part, absent = _claim(where, req, fsync)
    name = part.name
    seg = segments.Run(req.segments, part, req.url, req.headers, req.credentials, limits, deadline, req.limit_rate,
                       on_chunk)
    response: requests.Response | None = None
    try:
        known = None if req.force or absent else labels.load_validators(where, name, req.url, req.sha256)
        # [segments] a range map kept with the temp file: only its missing ranges are fetched
        response = None if part.found_empty else seg.resume()
        # A stopped worker's note on a one-stream part (tasks/partial.py), when no range map was there.
        noted = (None if response is not None or req.resume or req.force or part.found_empty
                 else partial.left(part.fd, req.url))
        headers = {} if response is not None else _resume_headers(
            part, req.resume or (noted and {**noted, "part": part.identity()}))
        if known and not headers:
            if known.etag:
                headers["If-None-Match"] = known.etag
            if known.last_modified:
                headers["If-Modified-Since"] = known.last_modified
        if response is None:
            response = _open(req.url, {**req.headers, **headers}, limits, part, deadline, req.credentials)
        if response.status_code == 304 and known:
            response.close()
            part.discard()
            return Outcome("unchanged", _rel(req, name), known.bytes, known.sha256, 304, response.url,
                           {"etag": known.etag or "", "last_modified": known.last_modified or ""})
        marked = noted is not None or bool(req.resume)  # a resumed part may carry an earlier attempt's note
        if response.status_code == 200:
            marked = partial.mark(part.fd, req.url, _validators_of(response), _length(response)) or marked
        response = seg.stream(response, lambda r, hook: _stream(r, part, req, limits, deadline, hook))  # [segments]
        if marked:
            partial.clear(part.fd)
        digest = part.hash.hexdigest()
        if req.sha256 and digest != req.sha256:
            raise PermanentError(f"sha256 mismatch: expected {req.sha256}, got {digest}")
        size = part.size
        found = _validators_of(response)
        validators = labels.Validators(storage.url_key(req.url), size, digest, found.get("etag"),
                                        found.get("last_modified"))
        labelled = labels.label(part.fd, validators)
        name, st = _commit(part, where, req, response, fsync, stat_after=not labelled)
        if st is not None:
            labels.save_validators(where, name, validators.stamp(st))
        return Outcome("done", _rel(req, name), size, digest, response.status_code, response.url,
                       {**_headers_of(response), **seg.notes})
    except TransientError as exc:
        kept = _validators_of(response) if response is not None and part.size > 0 else {}
        if kept:
            kept["part"] = part.identity()
        exc.resume = kept or None
        part.close() if kept or seg.kept else part.discard()  # [segments] a range map is worth keeping too
        raise
    except BaseException:
        part.discard()
        seg.abandon()
        raise


def _rel(req: Request, name: str) -> str:
    return str(Path(req.subdir, name)) if req.subdir else name


_MAX_CANDIDATES = 64


def _claim(where: storage.TargetDir, req: Request, fsync: bool) -> tuple[storage.PartFile, bool]:
    """The locked temp file of the first of the URL's names (its own, then hashed ones) that no other URL holds:
    neither another URL's attempt writing it now nor another URL's finished file (two jobs in one directory whose
    URLs both end in `index.html`). Checked under the name's lock, which every writer of the name holds until its
    rename, so no record marked done ever describes a file that another URL replaced. With it, whether nothing is
    at that name (no earlier download whose validators to load)."""
    for candidate in itertools.islice(candidates(req.name, req.url), _MAX_CANDIDATES):
        try:
            part = storage.PartFile(where, candidate, durable=fsync, url=req.url)
        except Busy:
            writer = storage.writer_of(where, candidate)
            if writer is None or writer == storage.url_key(req.url):
                raise  # this URL's own other delivery (or one we cannot tell apart): it steps aside
            continue
        held = labels.held_by_other_url(where, candidate, req.url)
        if not held:
            return part, held is None
        part.give_up()
    raise PermanentError(f"no free file name for {req.name} after {_MAX_CANDIDATES} tries")


def _commit(part: storage.PartFile, where: storage.TargetDir, req: Request, response: requests.Response,
            fsync: bool, stat_after: bool) -> tuple[str, os.stat_result | None]:
    """Rename into place. The producer gave every URL of a job its own name, so that name is replaced (an
    earlier run's file). With --content-disposition a server may name any file, so no name is replaced then
    but this URL's own untouched earlier download: the first free candidate is taken, atomically."""
    if not req.content_disposition and req.replace:
        return part.name, part.commit(fsync, stat_after=stat_after)
    if not req.content_disposition:
        try:
            return part.name, part.commit(fsync, replace=False, stat_after=stat_after)
        except FileExistsError:
            if labels.owns(where, part.name, req.url):
                return part.name, part.commit(fsync, stat_after=stat_after)
            raise PermanentError(f"{part.name} exists: a task without a job never replaces a file") from None
    header = response.headers.get("content-disposition")
    chosen = (disposition_name(header) if header else None) or part.name
    for candidate in itertools.islice(candidates(chosen, req.url), _MAX_CANDIDATES):
        try:
            return candidate, part.commit(fsync, target=candidate, replace=False, stat_after=stat_after)
        except FileExistsError:
            if labels.owns(where, candidate, req.url):
                return candidate, part.commit(fsync, target=candidate, stat_after=stat_after)
    raise PermanentError(f"no free file name for {chosen} after {_MAX_CANDIDATES} tries")


def _open(url: str, headers: dict[str, str], limits: fetch.Limits, part: storage.PartFile,
          deadline: float, credentials: Credentials | None = None) -> requests.Response:
    """Open the response; a refused or ignored range starts over from zero."""
    per_host = credentials.headers_for if credentials else None
    proxy = credentials.proxy if credentials else None
    try:
        response = fetch.open_response(url, headers, limits, deadline, per_host, proxy)
    except PermanentError as exc:
        if exc.status != 416 or "Range" not in headers:
            raise
        part.restart()
        return fetch.open_response(url, _without_range(headers), limits, deadline, per_host, proxy)
    if "Range" in headers:
        if response.status_code == 206 and _range_ok(response, part.size):
            return response
        part.restart()  # 200: the server ignored Range or the file changed (If-Range): start over
        if response.status_code == 206:
            response.close()
            return fetch.open_response(url, _without_range(headers), limits, deadline, per_host, proxy)
    return response


def _without_range(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in ("Range", "If-Range")}


def _stream(response: requests.Response, part: storage.PartFile, req: Request, limits: fetch.Limits,
            deadline: float, on_chunk: Callable[[int, int | None], None] | None) -> None:
    """Append the body to the part file, enforcing the size limit, the deadline and Content-Length."""
    length = response.headers.get("content-length", "").strip()
    expected = part.size + int(length) if _DECIMAL.fullmatch(length) else None  # not isdigit(): "²" is a digit
    if req.max_size and expected is not None and expected > req.max_size:
        response.close()
        raise PermanentError(f"too large: {expected} bytes is over the limit of {req.max_size} (--max-size)")
    pace = Pace(req.limit_rate, fetch.CHUNK)
    try:
        for chunk in fetch.body_chunks(response, limits.read_timeout, deadline, pace.chunk):
            part.write(chunk)
            if req.max_size and part.size > req.max_size:
                raise PermanentError(f"too large: over the limit of {req.max_size} bytes (--max-size)")
            if on_chunk is not None:
                on_chunk(part.size, expected)
            pace.wait(len(chunk), deadline)
    except CutShort:
        if expected is None:
            raise
    if expected is not None and part.size != expected:
        raise TransientError(f"body cut short: {part.size} of {expected} bytes")


def _headers_of(response: requests.Response) -> dict[str, Any]:
    h = response.headers
    return {"content_type": h.get("content-type"), "etag": h.get("etag"), "last_modified": h.get("last-modified")}

