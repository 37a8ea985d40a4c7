"""The HTTP path alone: CPU per GET of fleetfetch's fetch (guard, pinned connection, streamed body) in a pool of
threads, beside plain requests doing the same GETs, and curl.

    python -m bench.http_path                  # 32 threads x 300 GETs of a 16 KiB file from nginx on 127.0.0.1
    python -m bench.http_path -t 32 -n 300 --size 16384

Each client runs in a process of its own: `fleetfetch` (`tasks.fetch.open_response` + `body_chunks`, one kept-alive
connection per thread, as a worker's download threads), `requests` (a `requests.Session` per thread, `get` with
`stream=True` and `iter_content`, as a script would) and `curl --parallel` (the same number of transfers at once).
No file is written: what is measured is the request and the body. Prints seconds, CPU µs per GET (user and
system) and context switches per GET (a voluntary one is a thread that waited: in a pool of Python threads, mostly
for the GIL).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.origins import plain_origin


def _client(kind: str, url: str, threads: int, gets: int) -> None:
    """Run in the child: `threads` threads of `gets` GETs each; print one line of figures."""
    if kind == "fleetfetch":
        from tasks import fetch
        from tasks.config import settings
        from tasks.context import TaskContext

        limits = TaskContext(settings).limits  # a worker's, from this process's settings

        def run() -> None:
            for _ in range(gets):
                response = fetch.open_response(url, {}, limits, time.monotonic() + 60)
                for _chunk in fetch.body_chunks(response, 30.0):
                    pass
    else:
        import requests

        def run() -> None:
            with requests.Session() as s:
                for _ in range(gets):
                    with s.get(url, stream=True, timeout=30) as response:
                        response.raise_for_status()
                        for _chunk in response.iter_content(1 << 20):
                            pass

    failures: list[BaseException] = []

    def guarded() -> None:
        try:
            run()
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=guarded) for _ in range(threads)]
    before, began = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failures:
        raise SystemExit(f"{kind}: {len(failures)} of {threads} threads failed: {failures[0]!r}")
    print(_figures(kind, time.monotonic() - began, before, resource.getrusage(resource.RUSAGE_SELF), threads * gets))


def _figures(kind: str, seconds: float, before: resource.struct_rusage, after: resource.struct_rusage,
             gets: int) -> str:
    def per(field: str, scale: float = 1.0) -> float:
        return (getattr(after, field) - getattr(before, field)) * scale / gets

    return (f"{kind:<12} {seconds:7.2f} {per('ru_utime', 1e6):9.0f} {per('ru_stime', 1e6):8.0f} "
            f"{per('ru_nvcsw'):10.1f} {per('ru_nivcsw'):9.1f}")


def _curl(url: str, threads: int, gets: int) -> str:
    listing = "".join(f"url = {url}\noutput = /dev/null\n" for _ in range(threads * gets))
    with tempfile.NamedTemporaryFile("w", suffix=".cfg") as cfg:
        cfg.write(listing)
        cfg.flush()
        before, began = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
        subprocess.run(["curl", "-s", "--no-progress-meter", "--parallel", "--parallel-max", str(threads),
                        "-K", cfg.name], check=True, stdout=subprocess.DEVNULL)
        seconds = time.monotonic() - began
        return _figures("curl", seconds, before, resource.getrusage(resource.RUSAGE_CHILDREN), threads * gets)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.http_path", description=__doc__.split("\n")[0])
    parser.add_argument("-t", "--threads", type=int, default=32, help="threads (a default worker has 32)")
    parser.add_argument("-n", "--gets", type=int, default=300, help="GETs per thread")
    parser.add_argument("--size", type=int, default=16 << 10, help="bytes of the file")
    parser.add_argument("--client", help=argparse.SUPPRESS)  # the child's side
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client(args.client, args.url, args.threads, args.gets)
        return
    work = Path(tempfile.mkdtemp(prefix="ff-http-path-"))
    try:
        work.chmod(0o755)  # nginx's workers read the file as another user
        (work / "site").mkdir()
        (work / "site" / "f.bin").write_bytes(os.urandom(args.size))
        origin = plain_origin(work / "site", work / "nginx")
        try:
            url = f"{origin.base_url}/f.bin"
            print(f"{args.threads} threads x {args.gets} GETs of {args.size} bytes from {type(origin).__name__} "
                  f"on 127.0.0.1")
            print(f"{'client':<12} {'seconds':>7} {'user µs':>9} {'sys µs':>8} {'vol. cs':>10} {'invol. cs':>9}"
                  "   (per GET)")
            env = dict(os.environ, FLEETFETCH_ALLOW_NETWORKS="127.0.0.0/8")  # the origin is on loopback
            for kind in ("fleetfetch", "requests"):
                subprocess.run([sys.executable, "-m", "bench.http_path", "--client", kind, "--url", url,
                                "-t", str(args.threads), "-n", str(args.gets)], check=True, env=env)
            if shutil.which("curl"):
                print(_curl(url, args.threads, args.gets))
        finally:
            origin.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
