"""Following a job: a progress bar on a terminal, plain lines in a pipe, and the closing summary."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tasks.ledger import FINAL, Ledger

from .errors import LocalFailure
from .units import human_bytes, human_rate

# The job's end wakes the wait between two polls at once (`Ledger.end_of`); the polls show progress, and catch an
# end announced before the wait subscribed.
POLL_S = 0.1  # one small round-trip; at most this long between two
POLL_FRACTION = 0.05  # ... and at first a twentieth of the time followed so far: a short job is reported within 5 %
POLL_MIN_S = 0.005  # of its time after it ends (local mode's fixed cost), a long one is polled 10 times a second
PLAIN_EVERY_S = 5.0
IDLE_HINT_S = 30.0
MAX_LISTED_FAILURES = 50
GROUP_FROM = 5  # URLs failed for one reason shown as one line from this many on; fewer, each with its URL


def finished(counts: dict[str, int]) -> int:
    return sum(counts[s] for s in FINAL)


def _line(counts: dict[str, int], total: int, elapsed: float) -> str:
    size = counts["bytes"]
    return (f"progress: {finished(counts)}/{total} finished ({counts['done']} done, {counts['unchanged']} unchanged, "
            f"{counts['failed']} failed, {counts['cancelled']} cancelled, {counts['started']} running), "
            f"{human_bytes(size)}, "
            f"{human_rate(size, elapsed)}")


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def follow(ledger: Ledger, job: str, total: int, *, quiet: bool, alive: Callable[[], str | None],
           tick: Callable[[], object] = lambda: None, tick_every: float = 15.0,
           feed: Callable[[], object] = lambda: None, feed_every: float = 1.0, local: bool = False) -> dict:
    """Poll the job's counters (one round-trip each) until every URL has its final record, waiting between two
    polls on the job's end (`Ledger.end_of`: the last URL's final state wakes the wait at once); `tick` (the
    reconciler) runs every `tick_every` seconds meanwhile, `feed` (the job's window) every `feed_every`; `local`:
    the workers are local mode's own (`alive` watches them), so a stall is not a missing worker.
    JobGone if the backend lost the job."""
    started = last_tick = last_feed = time.monotonic()
    err = sys.stdout
    tty = err.isatty() and not quiet
    last_plain, last_change, last_done = started, started, -1
    first_bytes: int | None = None  # the bytes already counted when following began (a resumed job's)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=Console(file=err),
                   disable=not tty, transient=True)
    with bar, ledger.end_of(job) as end:
        task_id = bar.add_task(job, total=total, info="")
        while True:
            counts = _counts_waiting(ledger, job, alive)
            done, now = finished(counts), time.monotonic()
            if tty:
                first_bytes = counts["bytes"] if first_bytes is None else first_bytes
                info = _bar_info(counts, total, _in_flight(ledger, job), counts["bytes"] - first_bytes, now - started)
                bar.update(task_id, completed=done, info=info)
            if done >= total:
                return counts
            if done != last_done:
                last_done, last_change = done, now
            problem = alive()
            if problem:
                raise LocalFailure(problem)
            if now - last_feed >= feed_every:
                last_feed = now
                _tick_quietly(feed)
            if now - last_tick >= tick_every:
                last_tick = now
                _tick_quietly(tick)
            if not tty and not quiet and now - last_plain >= PLAIN_EVERY_S:
                print(_line(counts, total, now - started), file=err, flush=True)
                last_plain = now
            if now - last_change >= IDLE_HINT_S and not quiet:
                print(_idle_hint(counts, local), file=err, flush=True)
                last_change = now
            end.wait(poll_wait(now - started))  # returns as soon as the job's last URL ends


def _in_flight(ledger: Ledger, job: str) -> tuple[int, int | None]:
    """The running downloads' bytes so far and their size in all (None: unknown); (0, 0) if the backend fails."""
    try:
        return ledger.in_flight(job)
    except (redis.RedisError, OSError):
        return 0, 0


def _bar_info(counts: dict[str, int], total: int, flight: tuple[int, int | None], new_bytes: int,
              elapsed: float) -> str:
    """The bar's text, as curl, wget and aria2c show it: failures, bytes (with the running downloads' bytes so far,
    and of how many once no URL waits), rate and ETA."""
    so_far, sizes = flight
    now = counts["bytes"] + so_far
    rate = (new_bytes + so_far) / max(elapsed, 1e-9)
    waiting = total - finished(counts) - counts["started"]
    text = f"{counts['failed']} failed, {human_bytes(now)}"
    eta: float | None = None
    if waiting <= 0 and sizes and counts["started"]:  # only running downloads are left, their sizes known
        text += f" of {human_bytes(counts['bytes'] + sizes)}"
        eta = (sizes - so_far) / rate if rate > 0 else None
    elif finished(counts):
        eta = elapsed * (total - finished(counts)) / finished(counts)
    text += f", {human_bytes(rate)}/s"
    if eta is not None:
        text += f", ETA {int(eta) // 60}:{int(eta) % 60:02d}"
    return text


RATE_SAMPLE_S = 1.0  # `status` looks at the running downloads' bytes twice, this far apart, for their rates
MAX_RUNNING_SHOWN = 10


def running_files(ledger: Ledger, job: str, sample_s: float = RATE_SAMPLE_S) -> list[dict[str, Any]]:
    """The job's running downloads that published their bytes (big files: a worker does every 0.5 s), largest
    first: index, name, bytes so far, size (None: unknown), rate in bytes/s over `sample_s`."""
    before = ledger.running_files(job)
    if not before:
        return []
    began = time.monotonic()
    time.sleep(sample_s)
    after = ledger.running_files(job)
    elapsed = time.monotonic() - began
    files = []
    for index, (done, size) in after.items():
        entry = ledger.entry(job, index)
        rate = max(0, done - before[index][0]) / elapsed if index in before else None
        files.append({"index": index, "name": entry[1] if entry else str(index), "bytes": done, "size": size,
                      "rate": rate})
    return sorted(files, key=lambda f: -(f["size"] or f["bytes"]))


def running_line(f: dict[str, Any]) -> str:
    """One running download as `status` shows it: name, bytes of size (percent), rate."""
    text = f"  running: {f['name']}: {human_bytes(f['bytes'])}"
    if f["size"]:
        text += f" of {human_bytes(f['size'])} ({100 * f['bytes'] // f['size']}%)"
    return text + (f", {human_bytes(f['rate'])}/s" if f["rate"] is not None else "")


def _idle_hint(counts: dict[str, int], local: bool) -> str:
    if local:
        return (f"waiting: no URL finished in the last {IDLE_HINT_S:.0f} s ({counts['started']} running, "
                f"{counts['retrying']} waiting to retry): slow or paused hosts; `status` shows paused ones")
    return (f"waiting: no URL finished in the last {IDLE_HINT_S:.0f} s - is a worker running? "
            "(celery -A tasks worker)")


def poll_wait(elapsed: float) -> float:
    """Seconds until the next poll of a job followed for `elapsed` seconds."""
    return min(POLL_S, max(POLL_MIN_S, elapsed * POLL_FRACTION))


def _tick_quietly(tick: Callable[[], object]) -> None:
    """The producer's help with lost URLs is a bonus: the workers sweep too, so a failure here is not fatal."""
    with contextlib.suppress(redis.RedisError, OSError):
        tick()


def _counts_waiting(ledger: Ledger, job: str, alive: Callable[[], str | None]) -> dict[str, int]:
    """The job's counters; while the backend is unreachable, say so and keep waiting (it may restart), unless
    `alive` says it cannot (local mode's server died)."""
    told = False
    while True:
        try:
            return ledger.counts(job)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            problem = alive()
            if problem:
                raise LocalFailure(problem) from None
            if not told:
                print(f"waiting: the result backend is unreachable ({exc}); retrying until it is back "
                      "(Ctrl-C to stop following)", file=sys.stderr, flush=True)
                told = True
            time.sleep(1)


def summary(counts: dict[str, int], fails: list[dict[str, Any]], seconds: float) -> str:
    size = counts["bytes"]
    lines = [f"summary: {counts['done']} downloaded, {counts['unchanged']} unchanged, {counts['failed']} failed; "
             f"{human_bytes(size)} in {seconds:.1f} s ({human_rate(size, seconds)})"]
    if counts.get("cancelled"):
        lines[0] = lines[0].replace(" failed;", f" failed, {counts['cancelled']} cancelled;", 1)
    shown = []
    for reason, urls in grouped(fails).items():
        if len(urls) >= GROUP_FROM:
            shown.append(f"  {len(urls)} × failed: {reason} ({urls[0]} and {len(urls) - 1} more)")
        else:
            shown.extend(f"  failed: {url}: {reason}" for url in urls)
    lines.extend(shown[:MAX_LISTED_FAILURES])
    if len(shown) > MAX_LISTED_FAILURES:
        lines.append(f"  ... and {len(shown) - MAX_LISTED_FAILURES} more (see --manifest or `results`)")
    return "\n".join(lines)


def grouped(fails: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The failed URLs by reason, reasons in the order they first failed: 200 URLs refused for one reason are one
    line."""
    groups: dict[str, list[str]] = {}
    for record in fails:
        groups.setdefault(str(record.get("reason")), []).append(str(record.get("url")))
    return groups
