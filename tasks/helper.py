"""The helper task of a big file spread over workers that share the volume (tasks/shared.py): claim a piece, fetch
it with Range and If-Range on a host slot, write it at its offset into the owner's temp file, mark it done; again
until no piece is left. It writes no record: the URL's task (the owner) does."""

from __future__ import annotations

import logging
import os
import socket
import stat
import time
from typing import Any

from celery import shared_task

from . import context, fetch, shared, storage
from .credentials import Credentials
from .download import Call, _headers, _job_options, _pause_host
from .errors import DownloadError, TransientError, UnsafeName
from .feed import job_queue
from .hostlimit import HostKeys, Lease
from .message import Entry, Message
from .naming import check_component
from .pace import Pace
from .rangefile import fill
from .ranges import BadRange, Piece, checked_range, range_headers

log = logging.getLogger("fleetfetch")
SLOT_WAIT_S = 1.0  # a helper waiting for a host slot looks again at least this often whether the file is done


@shared_task(bind=True, name=shared.SEGMENT_TASK, ignore_result=True)
def segment(self: Any, job: Any = None, index: Any = 0, gen: Any = "", *extra: Any, **unknown: Any) -> dict:
    """Help fetch the pieces of URL #index of `job` under the plan `gen`. A plan that is gone or newer (the file
    is done, started over, or this message came late) ends the task quietly."""
    if extra or unknown or not isinstance(job, str) or type(index) is not int or not isinstance(gen, str):
        return {"status": "refused", "reason": "bad helper message"}
    ctx = context.of(self.app)
    settings, ledger = ctx.settings, ctx.ledger()
    board = shared.Board(lambda: ctx.ledger().r, job, index, settings.result_expires, settings.url_lease)
    plan, entry, options = board.load(), ledger.entry(job, index), _job_options(ledger, job)
    if plan is None or plan.gen != gen or entry is None or options is None:
        log.info("Nothing left to help with for job %s #%s", job, index)
        return {"status": "nothing to do"}
    msg = Message.of(job, Entry(index, *entry), options)
    if plan.url != storage.url_key(msg.url):
        return {"status": "refused", "reason": "the plan is not this URL's"}
    secrets = ledger.secret_headers(job, index) if msg.options.secret_headers else []
    logins = Credentials.from_json(ledger.credentials(job)) if msg.options.credentials else None
    call = Call(self, msg, msg.options.resolve(settings), secrets, logins)
    with storage.TargetDir(settings.download_dir, call.opts.subdir) as where:
        fd = _open_part(where, plan)
        if fd is None:
            return {"status": "nothing to do"}
        try:
            fetched = _help(call, board, plan, fd)
        finally:
            os.close(fd)
    log.info("Helped with %s (job %s #%s): %d piece(s)", msg.name, job, index, fetched)
    return {"status": "helped", "pieces": fetched}


def owner_side(call: Call) -> shared.Shared:
    """Workers that share the volume fetch a big file's pieces together: this task and its helpers."""
    job, index, ctx = call.msg.job or "", call.msg.index, call.ctx
    settings = ctx.settings
    board = shared.Board(lambda: ctx.ledger().r, job, index, settings.result_expires, settings.url_lease)

    def helpers(gen: str, count: int) -> None:
        queue = job_queue(ctx.ledger().meta(job))
        for _ in range(max(0, count)):
            call.task.app.send_task(shared.SEGMENT_TASK, kwargs={"job": job, "index": index, "gen": gen}, queue=queue,
                          ignore_result=True)

    who = f"{call.task.request.hostname or socket.gethostname()} {call.task.request.id or id(call)}"
    return shared.Shared(board, who, call.opts.subdir, helpers, settings.url_lease)


def _open_part(where: storage.TargetDir, plan: shared.Plan) -> int | None:
    """The owner's temp file, for writing at offsets (the owner holds its lock); None if it is not the file the
    plan describes (renamed into place, started over, or something planted)."""
    name = plan.part[1:-len(storage.PART_SUFFIX)]
    try:  # one temp file's name in the URL's directory, nothing else (the plan comes from Redis)
        if plan.part != f".{check_component(name)}{storage.PART_SUFFIX}":
            return None
        fd = os.open(plan.part, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=where.fd)
    except (OSError, UnsafeName):
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_ino != plan.inode or st.st_size != plan.size or st.st_nlink != 1 \
            or st.st_uid != os.getuid():
        os.close(fd)
        return None
    return fd


def _help(call: Call, board: shared.Board, plan: shared.Plan, fd: int) -> int:
    """Pieces one after another, each on a host slot taken for it; returns how many this task fetched."""
    settings = call.ctx.settings
    deadline = time.monotonic() + settings.soft_time_limit
    pace = Pace(int(call.opts.limit_rate or 0) // max(1, int(call.opts.split or 1)), fetch.CHUNK)
    who = f"{call.task.request.hostname} {call.task.request.id}"
    fetched = 0
    while time.monotonic() < deadline:
        slot = _slot(call, board, plan.gen)
        if slot is False:
            return fetched
        piece = board.claim(plan.gen)
        if piece == shared.BUSY:  # every piece claimed: a claim that lapses (its worker died) is taken over
            _release(call, slot, True)
            time.sleep(min(1.0, settings.url_lease / 4))
            continue
        if piece < 0:
            _release(call, slot, True)
            return fetched
        try:
            with call.ctx.leases.hold(None, 0, slot if isinstance(slot, Lease) else None):
                _fill(call, board, plan, fd, piece, pace, deadline)
            board.finish(plan.gen, piece, who)
            fetched += 1
        except BadRange as exc:
            board.refuse(plan.gen, str(exc))
            _release(call, slot, True)
            return fetched
        except DownloadError as exc:
            board.give_back(plan.gen, piece)
            if isinstance(exc, TransientError):
                _pause_host(call.ctx, exc, call.host, 1)
            _release(call, slot, False)
            return fetched
        except BaseException:
            board.give_back(plan.gen, piece)
            _release(call, slot, False)
            raise
        _release(call, slot, True)
    return fetched


def _slot(call: Call, board: shared.Board, gen: str) -> Lease | None | bool:
    """A slot of the host for the next piece (None: no per-host limit), waiting for one as long as the plan has
    pieces to claim; False when it has none."""
    per_host, rate = int(call.opts.per_host or 0), float(call.opts.host_rate or 0)
    if per_host <= 0 and rate <= 0:
        return None
    waiter = f"segments:{call.task.request.id}"
    limiter = call.ctx.limiter()
    while True:
        lease, wait = limiter.acquire(call.host, per_host, rate, waiter=waiter)
        if lease is not None:
            return lease
        if _over(board, gen):
            limiter.r.zrem(HostKeys(call.host).wait, waiter)
            return False
        limiter.wait(call.host, min(wait, SLOT_WAIT_S))


def _over(board: shared.Board, gen: str) -> bool:
    """Nothing left to help with: the plan is gone, newer or refused, or every piece is done."""
    plan = board.load()
    return plan is None or plan.gen != gen or bool(board.refused()) or len(board.done()) >= len(plan.pieces)


def _release(call: Call, slot: Lease | None | bool, answered: bool) -> None:
    if isinstance(slot, Lease):
        call.ctx.limiter().release(slot, answered)


def _fill(call: Call, board: shared.Board, plan: shared.Plan, fd: int, piece: int, pace: Pace,
          deadline: float) -> None:
    """One piece into its place, flushed to the disk before it is marked done."""
    start, end = plan.pieces[piece]
    limits, lease = call.ctx.limits, call.ctx.settings.url_lease
    per_host = call.credentials.headers_for if call.credentials else None
    proxy = call.credentials.proxy if call.credentials else None
    headers = {**_headers(call), **range_headers(start, end, plan.validator)}
    response = fetch.open_response(call.msg.url, headers, limits, deadline, per_host, proxy)
    checked_range(response, start, end, plan.size, plan.validator)
    renewed = time.monotonic()

    def write(chunk: bytes, at: int) -> None:
        nonlocal renewed
        storage.write_at(fd, chunk, at)
        if time.monotonic() - renewed > lease / 3:
            board.renew(plan.gen, piece)
            renewed = time.monotonic()

    fill(Piece(start, end), response, write, limits.read_timeout, deadline, pace)
    os.fdatasync(fd)
