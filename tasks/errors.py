"""Every way a download can fail, in one tree; the task decides retry or record by the class alone.

    DownloadError                 reason: the one line that ends up in the URL's record
    ├── TransientError            worth another attempt: connection trouble, timeouts, 408/425/429/5xx
    │   │                         .resume: validators of a kept partial file (Range on the next attempt)
    │   ├── CutShort              the body ended before Content-Length said it would
    │   └── Busy                  another delivery of the same URL is writing its file right now: this one
    │                             steps aside (no attempt counted, no record; the running one holds the lease)
    ├── PermanentError            not worth another attempt: 404, refused destination, bad digest, too large
    │   ├── UnsafeName            a file name that is not one safe path component
    │   └── BadMessage            a task message this worker cannot read (unknown option, wrong type)
    └── Cancelled                 the job was cancelled (`fleetfetch cancel`): the URL ends `cancelled`, no file

`status` and `retry_after` carry the HTTP answer where there was one (host pauses are decided from them).
Foreign exceptions (requests, urllib3, OSError) are mapped to these by type in `http_errors` and `storage`, never
by matching their message text.
"""

from __future__ import annotations


class DownloadError(Exception):
    """A failed attempt; `reason` is the one-line text that ends up in the record."""

    def __init__(self, reason: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


class TransientError(DownloadError):
    """Worth another attempt; `resume` holds the validators of a partial file worth continuing, if any."""

    resume: dict[str, str] | None = None


class CutShort(TransientError):
    """The server closed the connection before sending all the bytes it announced."""


class Busy(TransientError):
    """Another delivery of the same URL holds its temp file: a duplicate, which ends without a record."""


class PermanentError(DownloadError):
    """Not worth another attempt."""


class UnsafeName(PermanentError, ValueError):
    """A name that is not one safe path component."""


class BadMessage(PermanentError):
    """A task message that does not follow the contract in `tasks.message`."""


class Cancelled(DownloadError):
    """The URL's job was cancelled while it ran: its temp file is removed and it ends as cancelled."""
