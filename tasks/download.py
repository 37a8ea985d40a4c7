"""The Celery task: one URL per task; host slot, ledger transitions, retries and the final record."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from functools import cache
from typing import Any, NoReturn
from urllib.parse import urlsplit

from billiard.process import current_process
from celery.exceptions import SoftTimeLimitExceeded

from . import fetch, hostlimit, ledger, transfer
from .app import app
from .config import TASK_NAME, settings
from .guard import Policy
from .redact import redact_text, redact_url
from .retry import DownloadError, TransientError, countdown

log = logging.getLogger("fleetfetch")


class DownloadFailed(Exception):
    """The task's failure as Celery (and Flower) shows it: one line naming the URL and the cause."""


@cache
def _limits() -> fetch.Limits:
    policy = Policy.from_settings(settings.allow_private, settings.allow_networks, settings.resolve)
    return fetch.Limits(settings.connect_timeout, settings.read_timeout, settings.max_redirects, policy)


def _ledger() -> ledger.Ledger:
    return ledger.for_url(settings.backend, settings.result_expires)


@cache
def _limiter_for(pid: int) -> hostlimit.HostLimiter:
    return hostlimit.HostLimiter(_ledger().r)


def _limiter() -> hostlimit.HostLimiter:
    return _limiter_for(os.getpid())  # a forked pool child gets its own


def _runner() -> str:
    name = current_process().name
    return threading.current_thread().name if name == "MainProcess" else name


def display_args(url: str, name: str) -> tuple[str, str]:
    """argsrepr/kwargsrepr for Flower and logs: the URL without its secrets."""
    return repr((redact_url(url), name)), "{}"


@dataclass
class Call:
    """One execution of the task: its arguments, its attempt number and its URL's ledger entry."""

    task: Any
    url: str
    name: str
    job: str | None
    index: int
    opts: dict[str, Any]
    started: float = field(default_factory=time.monotonic)

    @property
    def attempt(self) -> int:
        return int(self.opts.get("attempt") or 1)

    @property
    def host(self) -> str:
        return (urlsplit(self.url).hostname or "").lower()

    def mark(self, state: str, record: dict[str, Any] | None = None) -> str | None:
        """Move the URL to `state` in the ledger; returns the final state it already had, if any."""
        return _ledger().transition(self.job, self.index, state, record) if self.job else None

    def requeue(self, wait: float) -> NoReturn:
        """Send this task back to the queue, to run again in `wait` seconds (the process is freed)."""
        argsrepr, kwargsrepr = display_args(self.url, self.name)
        raise self.task.retry(countdown=wait, args=(self.url, self.name),
                              kwargs={"job": self.job, "index": self.index, "opts": self.opts},
                              argsrepr=argsrepr, kwargsrepr=kwargsrepr)

    def record(self, outcome: transfer.Outcome | None, **extra: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {"url": redact_url(self.url), "status": "failed", "attempts": self.attempt,
                               "elapsed_s": round(time.monotonic() - self.started, 3),
                               "worker": self.task.request.hostname or socket.gethostname()}
        if outcome is not None:
            rec.update(status=outcome.status, final_url=redact_url(outcome.final_url), path=outcome.path,
                       bytes=outcome.bytes, sha256=outcome.sha256, http_status=outcome.http_status,
                       **outcome.headers)
        if self.opts.get("waited_s"):
            rec["waited_s"] = self.opts["waited_s"]
        rec.update(extra)
        return rec


@app.task(bind=True, name=TASK_NAME, max_retries=None)
def download(self: Any, url: str, name: str, job: str | None = None, index: int = 0,
             opts: dict[str, Any] | None = None) -> dict[str, Any]:
    """Download `url` into FLEETFETCH_DIR/[subdir/]name and return its record."""
    call = Call(self, url, name, job, index, dict(opts or {}))
    lease = _take_slot(call)
    answered = False
    try:
        record = _run(call, lease)
        answered = True
        return record
    finally:
        if lease is not None:
            _limiter().release(lease, answered)


def _take_slot(call: Call) -> hostlimit.Lease | None:
    """A cluster-wide slot for the URL's host, or back to the queue until its turn is due."""
    per_host = int(call.opts.get("per_host", settings.per_host))
    rate = float(call.opts.get("host_rate", settings.host_rate))
    if per_host <= 0 and rate <= 0:
        return None
    lease, wait = _limiter().acquire(call.host, per_host, rate, waiter=call.task.request.id or "")
    if lease is None:
        call.opts.setdefault("wait_since", time.time())
        call.requeue(wait)
    waited = time.time() - call.opts.pop("wait_since", time.time())
    call.opts["waited_s"] = round(call.opts.get("waited_s", 0) + waited, 3)
    return lease


def _run(call: Call, lease: hostlimit.Lease | None) -> dict[str, Any]:
    if call.mark(ledger.STARTED) is not None:
        log.info("Already finished %s (job %s #%s): redelivery ignored", call.name, call.job, call.index)
        return _ledger().record(call.job, call.index) or {} if call.job else {}
    log.info("Starting download of %s %s", call.name, _runner())
    o = call.opts
    req = transfer.Request(url=call.url, name=call.name, subdir=o.get("subdir", ""), sha256=o.get("sha256"),
                           force=bool(o.get("force")), max_size=int(o.get("max_size") or settings.max_size),
                           resume=o.get("resume"), content_disposition=bool(o.get("content_disposition")))
    try:
        outcome = transfer.attempt(req, settings.download_dir, _limits(), fsync=not settings.no_fsync,
                                   deadline=call.started + settings.soft_time_limit, on_chunk=_renewer(lease))
    except TransientError as exc:
        if lease is not None:  # host politeness is on
            _pause_host(exc, call.host, call.attempt)
        if call.attempt < int(o.get("max_attempts") or settings.max_attempts):
            _retry(call, exc)
        return _fail(call, exc.reason)
    except DownloadError as exc:
        return _fail(call, exc.reason)
    except SoftTimeLimitExceeded:
        return _fail(call, f"time limit of {settings.time_limit} s exceeded")
    except Exception as exc:  # a bug must still end the URL with a record, never leave it "started"
        log.error("internal error on %s\n%s", redact_url(call.url), redact_text(traceback.format_exc()))
        return _fail(call, f"internal error: {type(exc).__name__}: {exc}")
    record = call.record(outcome)
    call.mark(outcome.status, record)
    log.info("Finished %s: %s, %d bytes in %.2f s", call.name, outcome.status, outcome.bytes, record["elapsed_s"])
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


def _pause_host(exc: DownloadError, host: str, attempt: int) -> None:
    """Pause the host for every worker: on 429/503 for Retry-After when given, else for the backoff; on other
    5xx once `host_errors` of them came in a row (from any worker), for a backoff that grows while they last."""
    if exc.status in (429, 503):
        wait = exc.retry_after if exc.retry_after is not None else settings.backoff_base * 2 ** (attempt - 1)
        _limiter().pause(host, min(wait, settings.max_retry_after))
    elif exc.status is not None and exc.status >= 500 and settings.host_errors > 0:
        paused = _limiter().server_error(host, settings.host_errors, settings.backoff_base, settings.backoff_cap)
        if paused:
            log.warning("Pausing host %s for %.1f s: %d or more server errors in a row", host, paused,
                        settings.host_errors)


def _retry(call: Call, exc: DownloadError) -> NoReturn:
    wait = countdown(call.attempt, exc.retry_after, base=settings.backoff_base, cap=settings.backoff_cap,
                     max_wait=settings.max_retry_after, visibility_timeout=settings.visibility_timeout)
    log.warning("Retrying %s in %.1f s (attempt %d failed: %s)", call.name, wait, call.attempt,
                redact_text(exc.reason))
    call.opts.update(resume=getattr(exc, "resume", None), last_error=exc.reason, attempt=call.attempt + 1)
    call.mark(ledger.RETRYING)
    call.requeue(wait)


def _fail(call: Call, reason: str) -> NoReturn:
    reason = redact_text(reason)
    call.mark(ledger.FAILED, call.record(None, path=call.name, reason=reason))
    log.error("Failed %s: %s", redact_url(call.url), reason)
    raise DownloadFailed(f"{redact_url(call.url)}: {reason}") from None  # no chained traceback: it quotes URLs
