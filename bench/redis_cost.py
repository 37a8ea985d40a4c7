"""What each piece of a URL's path costs one Redis, in CPU µs, measured alone on a scratch server.

`python -m bench.redis_cost [--urls N] [--repeats R]` starts a Redis of its own (no persistence) and measures,
with `INFO cpu` (user + system) before and after each piece, median of R:

* a round trip: one PING sent and answered before the next (what a call costs Redis beyond its commands);
* the URL's own scripts, pipelined so no round trip is counted: the slot and STARTED state (`slot_state.START`),
  the final state and the slot given back (`slot_state.FINISH`, a packed record of a download), marking a batch
  of 1000 published URLs queued (`mark_queued`), on a job of N URLs and a host whose window is at its ceiling;
* Celery's (kombu's) share per message, as fleetfetch's transport does it: LPUSH (pipelined, as the producer
  publishes), the take script (`kombu_redis._TAKE`, 11 messages a run) and the acks of one event-loop turn
  (MULTI ZREM HDEL EXEC for 4 messages, one round trip).

`python -m bench.ceiling --commands` counts how many of each a URL needs in a real job; docs/benchmarks.md puts the
two together.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from bench.realparts.servers import RedisServer
from tasks import hostlimit, kombu_redis, slot_state
from tasks.ledger import DONE, STARTED, Ledger

WINDOW = 50  # the default per-host ceiling, reached: the steady state of a long job on one host
CHUNK = 40  # slots taken, then given back, per pipeline (below the window)


def _cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _timed(r: redis.Redis, work: Callable[[], object]) -> float:
    before = _cpu(r)
    work()
    return _cpu(r) - before


def round_trip(r: redis.Redis, n: int) -> float:
    return _timed(r, lambda: [r.ping() for _ in range(n)]) / n


def url_scripts(r: redis.Redis, n: int, tag: str) -> dict[str, float]:
    """CPU per URL of mark_queued, START and FINISH, on a job of n URLs."""
    ledger, limiter = Ledger(r, 3600), hostlimit.HostLimiter(r)
    both = slot_state.SlotAndState(ledger, limiter)
    job, host = f"cost-{tag}", f"cost-{tag}.test"
    ledger.create(job, {"opts": {}}, ((i, f"http://127.0.0.1:9/f{i}.bin", f"f{i}.bin", None) for i in range(n)))
    r.hset(hostlimit.HostKeys(host).stats, mapping={"window": WINDOW, "avg_ms": 5})
    record = {"url": "u", "status": DONE, "bytes": 1024, "sha256": "ab" * 32, "http_status": 200,
              "content_type": "application/octet-stream", "elapsed_s": 0.003, "worker": "w1@h", "attempts": 1,
              "final_url": "u", "path": "f.bin"}
    ledger.transition_keys_args(job, 0, DONE, record, None, "f.bin")  # worker and content type numbered

    def mark() -> None:
        for start in range(0, n, 1000):
            pipe = r.pipeline(transaction=True)
            ledger.mark_queued(pipe, job, list(range(start, min(n, start + 1000))))
            pipe.execute()

    out = {"mark_queued": _timed(r, mark) / n, "START": 0.0, "FINISH": 0.0}
    for first in range(0, n, CHUNK):
        indexes, slots = range(first, min(n, first + CHUNK)), []
        pipe = r.pipeline(transaction=False)
        for i in indexes:
            lease_id = hostlimit.new_lease_id()
            acquire = limiter.acquire_keys_args(host, WINDOW, 0.0, "t", False, lease_id)
            slot_state._call(lambda keys, args, p=pipe: both._start(keys=keys, args=args, client=p), acquire,
                             ledger.transition_keys_args(job, i, STARTED, lease=300))
            slots.append(hostlimit.Lease(host, lease_id, WINDOW))
        out["START"] += _timed(r, pipe.execute)
        pipe = r.pipeline(transaction=False)
        for i, slot in zip(indexes, slots, strict=True):
            slot_state._call(lambda keys, args, p=pipe: both._finish(keys=keys, args=args, client=p),
                             ledger.transition_keys_args(job, i, DONE, record, None, "f.bin"),
                             limiter.release_keys_args(slot, True))
        out["FINISH"] += _timed(r, pipe.execute)
    if ledger.counts(job)["done"] != n:
        raise SystemExit(f"bench.redis_cost: {ledger.counts(job)} after {n} downloads")
    return out | {"START": out["START"] / n, "FINISH": out["FINISH"] / n}


def _message() -> str:
    """A task message as kombu keeps it in the queue (its JSON envelope around fleetfetch's body)."""
    body = json.dumps([["http://127.0.0.1:9/f123.bin", "f123.bin"], {"job": "20261206-134500-123456", "index": 123},
                       {}])
    return json.dumps({
        "body": base64.b64encode(body.encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "fleetfetch.download", "id": f"20261206-134500-123456-{uuid.uuid4().hex}"},
        "properties": {"delivery_mode": 2, "delivery_info": {"exchange": "", "routing_key": "fleetfetch"},
                       "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())}})


def celery_share(r: redis.Redis, n: int) -> dict[str, float]:
    """CPU per message of publishing, taking and acknowledging it."""
    messages, take = [_message() for _ in range(n)], r.register_script(kombu_redis._TAKE)

    def publish() -> None:
        for start in range(0, n, 1000):
            pipe = r.pipeline(transaction=False)
            for m in messages[start:start + 1000]:
                pipe.lpush("fleetfetch", m)
            pipe.execute()

    out = {"LPUSH": _timed(r, publish) / n}
    pipe = r.pipeline(transaction=False)
    for _ in range(n // 11):
        take(keys=["fleetfetch", kombu_redis.UNACKED_INDEX_KEY, kombu_redis.UNACKED_KEY], args=[11, time.time()],
             client=pipe)
    before = _cpu(r)
    taken = pipe.execute()
    out["take"] = (_cpu(r) - before) / (n // 11 * 11)
    tags = [json.loads(reply[i + 1])["properties"]["delivery_tag"] for reply in taken for i in range(0, len(reply), 3)]

    def ack() -> None:
        for start in range(0, len(tags), 4):
            batch = tags[start:start + 4]
            r.pipeline(transaction=True).zrem(kombu_redis.UNACKED_INDEX_KEY, *batch).hdel(
                kombu_redis.UNACKED_KEY, *batch).execute()

    out["ack"] = _timed(r, ack) / len(tags)
    r.delete("fleetfetch")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--urls", type=int, default=3000, help="URLs (and messages) per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-cost-"))
    server = RedisServer(work, appendonly=False).start()
    runs: dict[str, list[float]] = {}
    try:
        r = redis.Redis(port=server.port)
        for rep in range(args.repeats):
            found = {"round trip (PING)": round_trip(r, args.urls)}
            found |= {f"ours: {k}": v for k, v in url_scripts(r, args.urls, f"{rep}-{time.time_ns()}").items()}
            found |= {f"Celery: {k}": v for k, v in celery_share(r, args.urls).items()}
            for k, v in found.items():
                runs.setdefault(k, []).append(v * 1e6)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"Redis CPU µs (user + system), median of {args.repeats}, {args.urls} URLs/messages each:")
    for name, values in runs.items():
        print(f"  {name:<26} {statistics.median(values):6.1f}   ({', '.join(f'{v:.1f}' for v in values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
