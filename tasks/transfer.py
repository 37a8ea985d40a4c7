"""One download attempt: conditional/ranged request, stream into the temp file, verify, rename into place."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from . import fetch, storage
from .credentials import Credentials
from .errors import CutShort, PermanentError, TransientError
from .naming import check_component, disposition_name, with_hash

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


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


def _resume_headers(part: storage.PartFile, resume: dict[str, str] | None) -> dict[str, str]:
    """Range + If-Range to continue a kept partial file; empty (and the file emptied) otherwise."""
    validator = (resume or {}).get("etag") or (resume or {}).get("last_modified")
    if validator and part.keep_prefix() > 0:
        return {"Range": f"bytes={part.size}-", "If-Range": validator}
    part.restart()
    return {}


def _range_ok(response: requests.Response, offset: int) -> bool:
    match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
    return match is not None and int(match.group(1)) == offset


def attempt(req: Request, root: Path, limits: fetch.Limits, *, deadline: float, fsync: bool,
            on_chunk: Callable[[], None] | None = None) -> Outcome:
    """Run one attempt. Raises TransientError (with `.resume` when the partial file is worth keeping)."""
    directory = storage.target_dir(root, req.subdir)
    name = check_component(req.name)
    known = None if req.force else storage.load_validators(root, directory, name, req.url)
    rel = str(Path(req.subdir, name)) if req.subdir else name
    part = storage.PartFile(directory, name)
    response: requests.Response | None = None
    try:
        headers = _resume_headers(part, req.resume)
        if known and not headers:
            if known.etag:
                headers["If-None-Match"] = known.etag
            if known.last_modified:
                headers["If-Modified-Since"] = known.last_modified
        response = _open(req.url, {**req.headers, **headers}, limits, part, req.credentials)
        if response.status_code == 304 and known:
            response.close()
            part.discard()
            return Outcome("unchanged", rel, known.bytes, known.sha256, 304, response.url,
                           {"etag": known.etag or "", "last_modified": known.last_modified or ""})
        _stream(response, part, req, limits, deadline, on_chunk)
        digest = part.hash.hexdigest()
        if req.sha256 and digest != req.sha256:
            raise PermanentError(f"sha256 mismatch: expected {req.sha256}, got {digest}")
        size = part.size
        name = _commit(part, req, response, fsync)
        rel = str(Path(req.subdir, name)) if req.subdir else name
        found = _validators_of(response)
        storage.save_validators(root, directory, name, storage.Validators(req.url, size, digest, **found))
        return Outcome("done", rel, size, digest, response.status_code, response.url, _headers_of(response))
    except TransientError as exc:
        kept = _validators_of(response) if response is not None and part.size > 0 else {}
        exc.resume = kept or None
        part.close() if kept else part.discard()
        raise
    except BaseException:
        part.discard()
        raise


def _commit(part: storage.PartFile, req: Request, response: requests.Response, fsync: bool) -> str:
    """Rename into place; with --content-disposition under the server's name, hashed if that is taken."""
    header = response.headers.get("content-disposition") if req.content_disposition else None
    chosen = disposition_name(header) if header else None
    if not chosen or chosen == part.final.name:
        part.commit(fsync)
        return part.final.name
    for candidate in (chosen, with_hash(chosen, req.url)):
        try:
            part.commit(fsync, target=part.final.parent / candidate)
            return candidate
        except FileExistsError:
            continue
    part.commit(fsync)  # both taken (an earlier run of the same list): keep the URL's own name
    return part.final.name


def _open(url: str, headers: dict[str, str], limits: fetch.Limits, part: storage.PartFile,
          credentials: Credentials | None = None) -> requests.Response:
    """Open the response; a refused or ignored range starts over from zero."""
    per_host = credentials.headers_for if credentials else None
    proxy = credentials.proxy if credentials else None
    try:
        response = fetch.open_response(url, headers, limits, per_host, proxy)
    except PermanentError as exc:
        if exc.status != 416 or "Range" not in headers:
            raise
        part.restart()
        return fetch.open_response(url, _without_range(headers), limits, per_host, proxy)
    if "Range" in headers:
        if response.status_code == 206 and _range_ok(response, part.size):
            return response
        part.restart()  # 200: the server ignored Range or the file changed (If-Range): start over
        if response.status_code == 206:
            response.close()
            return fetch.open_response(url, _without_range(headers), limits, per_host, proxy)
    return response


def _without_range(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in ("Range", "If-Range")}


def _stream(response: requests.Response, part: storage.PartFile, req: Request, limits: fetch.Limits,
            deadline: float, on_chunk: Callable[[], None] | None) -> None:
    """Append the body to the part file, enforcing the size limit, the deadline and Content-Length."""
    length = response.headers.get("content-length")
    expected = part.size + int(length) if length and length.isdigit() else None
    if req.max_size and expected is not None and expected > req.max_size:
        response.close()
        raise PermanentError(f"too large: {expected} bytes is over the limit of {req.max_size} (--max-size)")
    pace = _Pace(req.limit_rate)
    try:
        for chunk in fetch.body_chunks(response, limits.read_timeout, pace.chunk):
            part.write(chunk)
            if req.max_size and part.size > req.max_size:
                raise PermanentError(f"too large: over the limit of {req.max_size} bytes (--max-size)")
            if time.monotonic() > deadline:
                raise PermanentError("time limit exceeded (FLEETFETCH_TIME_LIMIT)")
            if on_chunk is not None:
                on_chunk()
            pace.wait(len(chunk), deadline)
    except CutShort:
        if expected is None:
            raise
    if expected is not None and part.size != expected:
        raise TransientError(f"body cut short: {part.size} of {expected} bytes")


class _Pace:
    """--limit-rate: read in small chunks and sleep while ahead of `rate` bytes per second (average since start)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.chunk = min(fetch.CHUNK, max(4096, rate // 10)) if rate > 0 else fetch.CHUNK
        self.began, self.bytes = time.monotonic(), 0

    def wait(self, n: int, deadline: float) -> None:
        if self.rate <= 0:
            return
        self.bytes += n
        ahead = self.bytes / self.rate - (time.monotonic() - self.began)
        if ahead > 0:
            time.sleep(min(ahead, max(0.0, deadline - time.monotonic())))


def _headers_of(response: requests.Response) -> dict[str, Any]:
    h = response.headers
    return {"content_type": h.get("content-type"), "etag": h.get("etag"), "last_modified": h.get("last-modified")}

