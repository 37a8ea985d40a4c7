"""What a big download leaves on its temp file for an attempt after its worker was stopped (Ctrl-C in local mode,
a killed worker): the URL (as a digest) and the validators of the response being written, as an extended
attribute of `.NAME.part`, so the next attempt continues the file with Range + If-Range, as wget -c, curl -C -
and aria2c do. A retry within a task carries the same in its message instead (`RetryState.resume`)."""

from __future__ import annotations

import contextlib
import json
import os

from .storage import url_key

ATTR = "user.fleetfetch.part"
MIN_SIZE = 1 << 20  # smaller bodies are fetched again whole: not worth a system call each


def mark(fd: int, url: str, validators: dict[str, str], size: int | None) -> bool:
    """Note on the temp file which response it is being filled from; False when not (a small or unknown size, no
    validator to send in If-Range, a file system without user extended attributes)."""
    if size is None or size < MIN_SIZE or not validators:
        return False
    try:
        os.setxattr(fd, ATTR, json.dumps({"url": url_key(url), **validators}).encode())
    except OSError:
        return False
    return True


def left(fd: int, url: str) -> dict[str, str] | None:
    """The validators an earlier attempt at `url` noted on this temp file, if any."""
    try:
        noted = json.loads(os.getxattr(fd, ATTR))
    except (OSError, ValueError):
        return None
    if not isinstance(noted, dict) or noted.get("url") != url_key(url):
        return None
    return {k: str(noted[k]) for k in ("etag", "last_modified") if noted.get(k)} or None


def clear(fd: int) -> None:
    """The temp file is about to become the download: the note goes (it is not the file's own label)."""
    with contextlib.suppress(OSError):
        os.removexattr(fd, ATTR)
