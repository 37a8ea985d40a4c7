"""The Celery task: one URL per task; host slot, ledger transitions, retries and the final record."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn
from urllib.parse import urlsplit

from billiard.process import current_process
from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from celery.worker.request import Request

from . import context, fetch, hostlimit, segments, shared, transfer
from .config import TASK_NAME
from .credentials import Credentials
from .errors import BadMessage, Busy, Cancelled, DownloadError, TransientError
from .ledger import CANCELLED, FAILED, QUEUED, RETRYING, STARTED, Ledger
from .message import Entry, Message, Options, display_of
from .redact import redact_text, redact_url
from .retry import THROTTLE_STATUS, countdown, host_pause

log = logging.getLogger("fleetfetch")
CANCEL_CHECK_S = 0.5  # how often a running download looks whether its job was cancelled
PROGRESS_MIN = 1 << 20  # bytes: a smaller download's bytes in flight are not published for the producer's bar
IN_THREAD_WAIT_S = 5.0  # a pool thread waits this long in all for its host's slot before requeueing its task
RECHECK_S = 0.5  # a waiting pool thread asks for a slot again at least this often


class DownloadFailed(Exception):
    """The task's failure as Celery (and Flower) shows it: one line naming the URL and the cause."""


def _runner() -> str:
    name = current_process().name
    return threading.current_thread().name if name == "MainProcess" else name


@dataclass
class Call:
    """One execution of the task: its message and its URL's ledger entry."""

    task: Any
    msg: Message
    opts: Options  # the message's options with the worker's settings for those it leaves unset
    secrets: list[tuple[str, str]] = field(default_factory=list)  # secret headers, read from the ledger
    credentials: Credentials | None = None  # netrc logins and cookies, read from the ledger
    started: float = field(default_factory=time.monotonic)
    slot: hostlimit.Lease | None = None  # the host slot held, until given back
    started_with_slot: bool = False  # the URL was marked started by the script that took its slot
    already: str | None = None  # then: the final state the URL already had
    ctx: context.TaskContext = field(init=False)  # the settings and clients of the task's app

    def __post_init__(self) -> None:
        self.ctx = context.of(self.task.app)

    @property
    def host(self) -> str:
        return (urlsplit(self.msg.url).hostname or "").lower()

    @property
    def path(self) -> str:
        """Where the file is or would be, below the download directory (a failed or cancelled record's `path`)."""
        return f"{self.opts.subdir}/{self.msg.name}" if self.opts.subdir else self.msg.name

    def mark(self, state: str, record: dict[str, Any] | None = None, lease: float | None = None) -> str | None:
        """Move the URL to `state` in the ledger; returns the final state it already had, if any."""
        m = self.msg
        return self.ctx.ledger().transition(m.job, m.index, state, record, lease, m.name) if m.job else None

    def finish(self, state: str, record: dict[str, Any]) -> None:
        """The download is over: its final state in the ledger and its host slot given back (the host answered),
        in one script run (in a threads pool, sent with the worker's next acks, just before them: slot_state.Ends)."""
        m, slot = self.msg, self.slot
        if slot is not None and m.job:
            both = self.ctx.slot_and_state()
            if not self.ctx.ends.add(both, m.job, m.index, state, record, m.name, slot):  # with the acks
                both.finish(m.job, m.index, state, record, m.name, slot)
        else:
            self.mark(state, record)
            if slot is not None:
                self.ctx.limiter().release(slot, True)
        self.slot = None

    def requeue(self, wait: float) -> NoReturn:
        """Send this task back to the queue, to run again in `wait` seconds (the process is freed)."""
        args, kwargs = self.msg.encode()
        argsrepr, kwargsrepr = self.msg.display()
        retry = self.task.retry(countdown=wait, args=args, kwargs=kwargs, argsrepr=argsrepr, kwargsrepr=kwargsrepr,
                                throw=False)
        raise retry from None  # no chained traceback in the RETRY state: the failure it chains may quote URLs

    def record(self, outcome: transfer.Outcome | None, **extra: Any) -> dict[str, Any]:
        m = self.msg
        rec: dict[str, Any] = {"url": redact_url(m.url), "status": "failed", "attempts": m.state.attempt,
                               "elapsed_s": round(time.monotonic() - self.started, 3),
                               "worker": self.task.request.hostname or socket.gethostname()}
        if outcome is not None:
            rec.update(status=outcome.status, final_url=redact_url(outcome.final_url), path=outcome.path,
                       bytes=outcome.bytes, sha256=outcome.sha256, http_status=outcome.http_status,
                       **outcome.headers)
        if m.state.waited_s:
            rec["waited_s"] = m.state.waited_s
        if m.state.redeliveries:
            rec["redeliveries"] = m.state.redeliveries
        rec.update(extra)
        return rec


class ShownRequest(Request):
    """A task request that shows its args where the message left argsrepr/kwargsrepr out (`feed.wire`): Flower,
    task events and `celery inspect` see the URL without its secrets, the job and the index."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("decoded") and not _well_formed(message.payload):
            # Not (args, kwargs, embed): Celery would fail in the pool before the task starts, and the message would
            # stay taken forever. The task gets arguments its decode refuses instead, and ends with a record.
            kwargs.update(body=((), {"malformed": True}, {}), decoded=True)
        super().__init__(message, *args, **kwargs)
        if not self.argsrepr or not self.kwargsrepr:
            shown: tuple[str, str] = display_of(self.args, self.kwargs)
            self._argsrepr, self._kwargsrepr = shown

def _well_formed(payload: Any) -> bool:
    """A task message body as Celery's protocol 2 has it: [args (a list), kwargs (an object), embed (an object)]."""
    return (isinstance(payload, list | tuple) and len(payload) == 3 and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict) and isinstance(payload[2], dict))


# throws: a failed URL is an expected outcome, not a bug in the task. Celery logs it as one INFO line ("raised
# expected: DownloadFailed(...)") instead of an ERROR with the same traceback of `_fail` each time (~20 lines per
# failed URL; formatting them cost more than the rest of the failure). It is still stored and shown as FAILURE.
@shared_task(bind=True, name=TASK_NAME, max_retries=None, Request=ShownRequest, throws=(DownloadFailed,))
def download(self: Any, url: str | None = None, name: str | None = None, job: str | None = None, index: int = 0,
             opts: dict[str, Any] | None = None, *extra: Any, **unknown: Any) -> dict[str, Any]:
    """Download `url` into FLEETFETCH_DIR/[subdir/]name and return its record. Any arguments bind (`extra`,
    `unknown`), so that a message off the contract ends with a record rather than a TypeError."""
    ctx = context.of(self.app)  # the settings of the app this worker serves, and what is built from them
    try:
        if extra or unknown:
            raise BadMessage("the task message has a bad shape: download(url, name, job=, index=, opts=) expected")
        msg, secrets, logins = _received(ctx, url, name, job, index, opts)
    except BadMessage as exc:
        return _refuse(self, url, job, index, exc.reason)
    call = Call(self, msg, ctx.resolved(msg.options), secrets, logins)
    call.slot = _take_slot(call)
    answered = False
    try:
        with call.ctx.leases.hold(msg.job, msg.index, call.slot):
            record = _run(call, call.slot is not None)
        answered = True
        return record
    finally:
        if call.slot is not None:  # not given back with the final state
            call.ctx.limiter().release(call.slot, answered)


def _received(ctx: context.TaskContext, url: Any, name: Any, job: Any, index: Any,
              opts: Any) -> tuple[Message, list[tuple[str, str]], Credentials | None]:
    """The message as this worker acts on it, with the secret headers and logins it may use. Anyone who can write
    to the broker (or a Flower user) can send one, so a message that names a job only points at one of its URLs:
    URL, name, digest and options are the ones the producer recorded in the ledger, and only the retry state is
    the message's. A message without a job gets no secrets and replaces no file (`transfer.Request.replace`)."""
    sent = Message.decode(url, name, job, index, opts)
    if sent.job is None:
        return replace(sent, options=replace(sent.options, secret_headers=False, credentials=False)), [], None
    ledger = ctx.ledger()
    entry, options = ledger.entry(sent.job, sent.index), _job_options(ledger, sent.job)
    if entry is None or options is None:
        raise BadMessage(f"job {sent.job} has no URL #{sent.index} in the ledger (expired, or not one of its URLs)")
    msg = Message.of(sent.job, Entry(sent.index, *entry), options, sent.state)
    secrets = ledger.secret_headers(sent.job, sent.index) if msg.options.secret_headers else []
    logins = Credentials.from_json(ledger.credentials(sent.job)) if msg.options.credentials else None
    return msg, secrets, logins


_options_of: dict[str, Options] = {}  # job -> its options (written once by the producer): one read per job



def _job_options(ledger: Ledger, job: str) -> Options | None:
    """The job's options as the producer recorded them; None for a job the ledger does not have."""
    options = _options_of.get(job)
    if options is None:
        found = ledger.options(job)
        if found is None:
            return None
        try:
            options = Options(**found)
        except TypeError:
            raise BadMessage(f"job {job} has options this worker does not know: upgrade the workers") from None
        if len(_options_of) >= 1024:
            _options_of.clear()
        _options_of[job] = options
    return options


def _refuse(task: Any, url: Any, job: Any, index: Any, reason: str) -> NoReturn:
    """A message off the contract fails with one record: the job's URL it names, if the ledger has it (a final
    state is kept: the ledger's transitions never change one); any other counter is left alone."""
    ok = isinstance(job, str) and type(index) is int and index >= 0
    entry = context.of(task.app).ledger().entry(job, index) if ok else None
    if entry is not None:
        _fail(Call(task, Message(entry[0], entry[1], job, index), Options()), reason)
    shown = url if isinstance(url, str) else f"(a {type(url).__name__} for a URL)"
    _fail(Call(task, Message(shown, "", None), Options()), reason)


def _take_slot(call: Call) -> hostlimit.Lease | None:
    """A cluster-wide slot for the URL's host. A pool thread waits for it in place (IN_THREAD_WAIT_S in all),
    then, and at once in a pool process, the task goes back to the queue until its turn is due: a process
    waiting would hold a whole download's worth of memory, and a requeue costs a round of Celery's retry
    handling, more than the download of a small file, and comes back only when its countdown is over."""
    per_host, rate = int(call.opts.per_host or 0), float(call.opts.host_rate or 0)
    if per_host <= 0 and rate <= 0:
        return None
    state = call.msg.state
    in_thread = threading.current_thread() is not threading.main_thread() and current_process().name == "MainProcess"
    limiter = call.ctx.limiter()
    began: float | None = None  # when this delivery first found no slot
    while True:
        slot, wait = _acquire(call, per_host, rate)
        if slot is not None:
            break
        if state.wait_since is None:
            state.wait_since = time.time()
        began = time.monotonic() if began is None else began
        waited = time.monotonic() - began  # the time waited, not the naps asked for: a release may end one early
        if not in_thread or waited >= IN_THREAD_WAIT_S:
            # held back on purpose: a lease covers it
            call.mark(QUEUED, lease=wait + call.ctx.settings.url_lease)
            call.requeue(wait)
        # The turn is an estimate from the host's window now, which may grow meanwhile (and is unknown at the
        # start of a job): look again at least every RECHECK_S rather than requeue on a guess.
        limiter.wait(call.host, min(wait, RECHECK_S, IN_THREAD_WAIT_S - waited))  # the message stays with this
        # worker, whose sweeper keeps its lease; a slot given back anywhere ends the wait early
    if state.wait_since is not None:
        state.waited_s = round(state.waited_s + time.time() - state.wait_since, 3)
        state.wait_since = None
    if began is not None:
        call.started = time.monotonic()  # the time limit and elapsed_s are the download's; the wait is waited_s
    return slot


def _acquire(call: Call, per_host: int, rate: float) -> tuple[hostlimit.Lease | None, float]:
    """A slot of the URL's host; for a job's URL, the URL marked started with it, in the same script run."""
    m = call.msg
    waiter, waited = call.task.request.id or "", m.state.wait_since is not None
    if not m.job:
        return call.ctx.limiter().acquire(call.host, per_host, rate, waiter=waiter, waited=waited)
    slot, wait, call.already = call.ctx.slot_and_state().start(m.job, m.index, call.ctx.settings.url_lease,
                                                               call.host, per_host, rate, waiter, waited)
    call.started_with_slot = slot is not None
    return slot, wait


def _run(call: Call, polite: bool) -> dict[str, Any]:
    m, o, s = call.msg, call.opts, call.ctx.settings
    already = call.already if call.started_with_slot else (call.mark(STARTED, lease=s.url_lease) if m.job else None)
    if m.job and already is not None:
        why = "the job was cancelled" if already == CANCELLED else "redelivery ignored"
        log.info("Already finished %s (job %s #%s): %s", m.name, m.job, m.index, why)
        return call.ctx.ledger().record(m.job, m.index) or {"status": already}
    if log.isEnabledFor(logging.DEBUG):  # naming the runner is work on every URL, for a line shown at DEBUG only
        log.debug("Starting download of %s %s", m.name, _runner())
    req = transfer.Request(url=m.url, name=m.name, subdir=o.subdir, sha256=o.sha256, force=o.force,
                           max_size=int(o.max_size or 0), resume=m.state.resume, replace=m.job is not None,
                           content_disposition=o.content_disposition, headers=_headers(call),
                           limit_rate=int(o.limit_rate or 0), credentials=call.credentials,
                           segments=_segments(call))
    watch = _ChunkWatch(call.ctx, m.job, m.index) if m.job else None
    try:
        outcome = transfer.attempt(req, s.download_dir, call.ctx.limits, fsync=not s.no_fsync,
                                   deadline=call.started + s.soft_time_limit, on_chunk=watch)
    except Cancelled:
        return _cancelled(call)
    except Busy:
        log.info("Another delivery of %s (job %s #%s) is running it: this one steps aside", m.name, m.job, m.index)
        return {"status": "duplicate", "url": redact_url(m.url)}
    except TransientError as exc:
        if polite:
            _pause_host(call.ctx, exc, call.host, m.state.attempt)
        if m.state.attempt < int(o.max_attempts or 1):
            _retry(call, exc)
        return _fail(call, exc.reason)
    except DownloadError as exc:
        return _fail(call, exc.reason)
    except SoftTimeLimitExceeded:
        return _fail(call, f"time limit of {s.time_limit} s exceeded")
    except Exception as exc:  # a bug must still end the URL with a record, never leave it "started"
        log.error("internal error on %s\n%s", redact_url(m.url), redact_text(traceback.format_exc()))
        return _fail(call, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        if watch is not None:
            watch.over()
    record = call.record(outcome)
    call.finish(outcome.status, record)
    log.info("Finished %s: %s, %d bytes in %.2f s", m.name, outcome.status, outcome.bytes, record["elapsed_s"])
    return record


def _shared(call: Call) -> shared.Shared | None:
    from .helper import owner_side  # the helper task's module imports this one

    return owner_side(call) if call.ctx.settings.shared_volume and call.msg.job else None


def _segments(call: Call) -> segments.Config:
    """--split: a big file's extra connections, each with a slot of the host's window taken without waiting."""
    o = call.opts
    per_host, rate = int(o.per_host or 0), float(o.host_rate or 0)
    return segments.Config(int(o.split or 1), int(o.min_split_size or 0),
                           _SegmentSlot.taker(call, per_host, rate) if per_host > 0 or rate > 0 else _NoSlot,
                           call.ctx.settings.host_lease, _shared(call))


class _NoSlot:
    """No per-host limit: an extra connection needs no slot."""

    def renew(self) -> None:
        pass

    def release(self, answered: bool) -> None:
        pass


@dataclass
class _SegmentSlot:
    """A slot of the host's window held by one extra segment connection; taken, renewed and given back from any of
    the download's threads (each through its own limiter: `_limiter` is per thread)."""

    lease: hostlimit.Lease
    ctx: context.TaskContext

    @staticmethod
    def taker(call: Call, per_host: int, rate: float) -> Callable[[], segments.Slot | None]:
        waiter = f"segments:{call.task.request.id or id(call)}"

        def take() -> segments.Slot | None:
            lease, _ = call.ctx.limiter().acquire(call.host, per_host, rate, waiter=waiter)
            if lease is None:  # a full window: fewer segments, and no place in the host's line
                call.ctx.limiter().r.zrem(hostlimit.HostKeys(call.host).wait, waiter)
                return None
            return _SegmentSlot(lease, call.ctx)

        return take

    def renew(self) -> None:
        self.ctx.limiter().renew(self.lease)

    def release(self, answered: bool) -> None:
        self.ctx.limiter().release(self.lease, answered)


class _ChunkWatch:
    """Called after each chunk: every CANCEL_CHECK_S, one round trip publishes the bytes so far (the producer's
    progress of a big file) and raises Cancelled once the job is cancelled. `over()` withdraws the bytes. A file
    under PROGRESS_MIN only looks for the cancel: one command, and nothing to withdraw."""

    def __init__(self, ctx: context.TaskContext, job: str, index: int) -> None:
        self.ctx, self.job, self.index = ctx, job, index
        self.last, self.published = time.monotonic(), False

    def __call__(self, size: int, expected: int | None) -> None:
        if time.monotonic() - self.last >= CANCEL_CHECK_S:
            self.last, small = time.monotonic(), expected is not None and expected < PROGRESS_MIN
            self.published = self.published or not small
            ledger_ = self.ctx.ledger()
            if ledger_.cancelled(self.job) if small else ledger_.running(self.job, self.index, size, expected):
                raise Cancelled("job cancelled")

    def over(self) -> None:
        if self.published:
            with contextlib.suppress(Exception):  # progress only: the URL's record is what matters
                self.ctx.ledger().landed(self.job, self.index)


def _cancelled(call: Call) -> dict[str, Any]:
    """End the URL as cancelled (its temp file is already gone): a record, no file, no retry."""
    record = call.record(None, path=call.path, status=CANCELLED, reason="job cancelled")
    call.mark(CANCELLED, record)
    log.info("Cancelled %s (job %s #%s)", call.msg.name, call.msg.job, call.msg.index)
    return record


def _headers(call: Call) -> dict[str, str]:
    """User-Agent, then the user's headers (a User-Agent among them wins), then the secret ones."""
    return {"User-Agent": call.opts.user_agent or fetch.USER_AGENT, **dict(call.opts.headers), **dict(call.secrets)}


def _pause_host(ctx: context.TaskContext, exc: DownloadError, host: str, attempt: int) -> None:
    """The host showed stress: halve its window, and apply the retry policy's host pause for this answer, for
    every worker."""
    window, s = ctx.limiter().halve(host), ctx.settings
    if window is not None:
        log.info("Host %s: %d downloads at once from now on (%s)", host, window, redact_text(exc.reason))
    streak = 0
    if exc.status is not None and exc.status >= 500 and exc.status not in THROTTLE_STATUS and s.host_errors:
        streak = ctx.limiter().server_error(host)
    pause = host_pause(exc.status, exc.retry_after, attempt, streak, threshold=s.host_errors,
                       base=s.backoff_base, cap=s.backoff_cap, max_wait=s.max_retry_after)
    if pause > 0:
        ctx.limiter().pause(host, pause)
        if streak:
            log.warning("Pausing host %s for %.1f s: %d server errors in a row", host, pause, streak)


def _retry(call: Call, exc: DownloadError) -> NoReturn:
    state, s = call.msg.state, call.ctx.settings
    wait = countdown(state.attempt, exc.retry_after, base=s.backoff_base, cap=s.backoff_cap,
                     max_wait=s.max_retry_after, visibility_timeout=s.visibility_timeout)
    log.warning("Retrying %s in %.1f s (attempt %d failed: %s)", call.msg.name, wait, state.attempt,
                redact_text(exc.reason))
    call.msg.state = replace(state, resume=getattr(exc, "resume", None), attempt=state.attempt + 1)
    call.mark(RETRYING, lease=wait + s.url_lease)
    call.requeue(wait)


def _fail(call: Call, reason: str) -> NoReturn:
    reason = redact_text(reason)
    call.mark(FAILED, call.record(None, path=call.path, reason=reason))
    log.error("Failed %s: %s", redact_url(call.msg.url), reason)
    raise DownloadFailed(f"{redact_url(call.msg.url)}: {reason}") from None  # no chained traceback: it quotes URLs
