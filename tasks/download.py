"""The Celery task: one URL per task; ledger transitions, retries and the final record."""

from __future__ import annotations

import logging
import socket
import threading
import time
from functools import cache
from typing import Any
from urllib.parse import urlsplit

from billiard.process import current_process
from celery.exceptions import SoftTimeLimitExceeded

from . import fetch, hostlimit, ledger, transfer
from .app import app
from .config import TASK_NAME, settings
from .guard import Policy
from .redact import redact_text, redact_url
from .retry import DownloadError, PermanentError, TransientError, countdown

log = logging.getLogger("fleetfetch")


class DownloadFailed(Exception):
    """The task's failure as Celery (and Flower) shows it: one line naming the URL and the cause."""


@cache
def _limits() -> fetch.Limits:
    policy = Policy.from_settings(settings.allow_private, settings.allow_networks, settings.resolve)
    return fetch.Limits(settings.connect_timeout, settings.read_timeout, settings.max_redirects, policy)


def _ledger() -> ledger.Ledger:
    return ledger.for_url(settings.backend, settings.result_expires)


def _limiter() -> hostlimit.HostLimiter:
    book = _ledger()
    if not hasattr(book, "limiter"):
        book.limiter = hostlimit.HostLimiter(book.r)  # type: ignore[attr-defined]
    return book.limiter  # type: ignore[attr-defined]


def _runner() -> str:
    name = current_process().name
    return threading.current_thread().name if name == "MainProcess" else name


def display_args(url: str, name: str) -> tuple[str, str]:
    """argsrepr/kwargsrepr for Flower and logs: the URL without its secrets."""
    return repr((redact_url(url), name)), "{}"


def _record(outcome: transfer.Outcome | None, url: str, attempts: int, started: float, **extra: Any) -> dict:
    base: dict[str, Any] = {"url": redact_url(url), "status": "failed", "attempts": attempts,
                            "elapsed_s": round(time.monotonic() - started, 3), "worker": socket.gethostname()}
    if outcome is not None:
        base.update(status=outcome.status, final_url=redact_url(outcome.final_url), path=outcome.path,
                    bytes=outcome.bytes, sha256=outcome.sha256, http_status=outcome.http_status, **outcome.headers)
    base.update(extra)
    return base


@app.task(bind=True, name=TASK_NAME, max_retries=None)
def download(self: Any, url: str, name: str, job: str | None = None, index: int | None = None,
             opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Download `url` into FLEETFETCH_DIR/[subdir/]name and return its record."""
    opts = dict(opts or {})
    started = time.monotonic()
    attempts = int(opts.get("attempt") or 1)
    host = (urlsplit(url).hostname or "").lower()
    per_host = int(opts.get("per_host", settings.per_host))
    lease = None
    if per_host > 0 or opts.get("host_rate", settings.host_rate):
        lease, wait = _limiter().acquire(host, per_host, float(opts.get("host_rate", settings.host_rate)),
                                         waiter=self.request.id or "")
        if lease is None:
            _requeue(self, url, name, job, index, opts, wait)
        opts["waited_s"] = round(opts.get("waited_s", 0) + time.time() - opts.pop("wait_since", time.time()), 3)
    try:
        return _attempt(self, url, name, job, index, opts, attempts, started, lease)
    finally:
        if lease is not None:
            _limiter().release(lease)


def _attempt(task: Any, url: str, name: str, job: str | None, index: int | None, opts: dict[str, Any],
             attempts: int, started: float, lease: hostlimit.Lease | None) -> dict[str, Any]:
    book = _ledger() if job else None
    if book is not None and book.transition(job, index, ledger.STARTED) is not None:
        log.info("Already finished %s (job %s #%s): redelivery ignored", name, job, index)
        return book.record(job, index) or {}
    log.info("Starting download of %s %s", name, _runner())
    req = transfer.Request(url=url, name=name, subdir=opts.get("subdir", ""), sha256=opts.get("sha256"),
                           force=bool(opts.get("force")), max_size=int(opts.get("max_size") or settings.max_size),
                           resume=opts.get("resume"))
    extra = {"waited_s": opts["waited_s"]} if opts.get("waited_s") else {}
    try:
        outcome = transfer.attempt(req, settings.download_dir, _limits(), fsync=settings.fsync,
                                   deadline=started + settings.soft_time_limit, on_chunk=_renewer(lease))
    except TransientError as exc:
        _pause_host(exc, urlsplit(url).hostname or "", attempts)
        if attempts < int(opts.get("max_attempts") or settings.max_attempts):
            _retry(task, exc, url, name, job, index, opts, attempts, book)
        return _fail(book, job, index, url, name, exc.reason, attempts, started, extra)
    except DownloadError as exc:
        return _fail(book, job, index, url, name, exc.reason, attempts, started, extra)
    except SoftTimeLimitExceeded:
        return _fail(book, job, index, url, name, f"time limit of {settings.time_limit} s exceeded",
                     attempts, started, extra)
    except Exception as exc:  # a bug must still end the URL with a record, never leave it "started"
        log.exception("internal error on %s", redact_url(url))
        return _fail(book, job, index, url, name, f"internal error: {type(exc).__name__}: {exc}", attempts,
                     started, extra)
    record = _record(outcome, url, attempts, started, **extra)
    if book is not None:
        book.transition(job, index, outcome.status, record)
    log.info("Finished %s: %s, %d bytes in %.2f s", name, outcome.status, outcome.bytes, record["elapsed_s"])
    return record


def _renewer(lease: hostlimit.Lease | None) -> Any:
    """A per-chunk callback that keeps a long download's host slot leased."""
    if lease is None:
        return None
    last = [time.monotonic()]

    def renew() -> None:
        if time.monotonic() - last[0] > hostlimit.LEASE_S / 3:
            _limiter().renew(lease)
            last[0] = time.monotonic()

    return renew


def _pause_host(exc: DownloadError, host: str, attempts: int) -> None:
    """429/503 pause the host for every worker: for Retry-After when given, else for the backoff."""
    if exc.status not in (429, 503):
        return
    wait = exc.retry_after if exc.retry_after is not None else settings.backoff_base * 2 ** (attempts - 1)
    _limiter().pause(host.lower(), min(wait, settings.max_retry_after))


def _requeue(task: Any, url: str, name: str, job: str | None, index: int | None, opts: dict[str, Any],
             wait: float) -> None:
    """No slot for this host now: give the task back with a short countdown and free the process."""
    opts.setdefault("wait_since", time.time())
    argsrepr, kwargsrepr = display_args(url, name)
    raise task.retry(countdown=wait, kwargs={"job": job, "index": index, "opts": opts}, args=(url, name),
                     argsrepr=argsrepr, kwargsrepr=kwargsrepr)


def _retry(task: Any, exc: DownloadError, url: str, name: str, job: str | None, index: int | None,
           opts: dict[str, Any], attempts: int, book: ledger.Ledger | None) -> None:
    wait = countdown(attempts, exc.retry_after, base=settings.backoff_base, cap=settings.backoff_cap,
                     max_wait=settings.max_retry_after, visibility_timeout=settings.visibility_timeout)
    opts["resume"] = getattr(exc, "resume", None)
    opts["last_error"] = exc.reason
    opts["attempt"] = attempts + 1
    if book is not None:
        book.transition(job, index, ledger.RETRYING)
    log.warning("Retrying %s in %.1f s (attempt %d failed: %s)", name, wait, attempts, redact_text(exc.reason))
    argsrepr, kwargsrepr = display_args(url, name)
    raise task.retry(countdown=wait, kwargs={"job": job, "index": index, "opts": opts},
                     args=(url, name), argsrepr=argsrepr, kwargsrepr=kwargsrepr)


def _fail(book: ledger.Ledger | None, job: str | None, index: int | None, url: str, name: str, reason: str,
          attempts: int, started: float, extra: dict[str, Any]) -> dict[str, Any]:
    reason = redact_text(reason)
    record = _record(None, url, attempts, started, path=name, reason=reason, **extra)
    if book is not None:
        book.transition(job, index, ledger.FAILED, record)
    log.error("Failed %s: %s", redact_url(url), reason)
    raise DownloadFailed(f"{redact_url(url)}: {reason}")


__all__ = ["download", "DownloadFailed", "PermanentError"]
