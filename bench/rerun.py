"""Re-running a list of unchanged files: `python -m bench.rerun [--files 10000] [--size 32768]`.

A list of N files is downloaded once in local mode with no options, then the same command runs again: every URL
ends `unchanged` after a conditional request (304), and a file whose inode, size and mtime are those recorded
when it was written is trusted without reading it. The third run touches every file first (new mtime): each is
hashed again before its conditional request — what every re-run did before the recorded stamp. Bytes read are
the `rchar` of the whole process tree (read(2) and friends: files, pipes; socket reads by recv(2) are not counted),
start-up included. aria2c (if installed) re-runs the same list with `--conditional-get` beside it.
nginx on 127.0.0.1 (the Python origin without it).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.origins import plain_origin
from bench.tools import ROOT, default_env


def rchar() -> int:
    """Bytes read by this process and its waited-for descendants (Linux folds those into /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    before, started = rchar(), time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    seconds, read = time.monotonic() - started, rchar() - before
    if proc.returncode != 0:
        raise SystemExit(f"{argv[2]} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-600:]}")
    return seconds, read, proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32 << 10, help="bytes per file")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fleetfetch-rerun-"))
    work.chmod(0o755)  # nginx's workers run as another user
    root = work / "www"
    root.mkdir()
    for i in range(args.files):
        (root / f"f{i}.bin").write_bytes(hashlib.sha256(str(i).encode()).digest() * (args.size // 32))
    origin = plain_origin(root, work / "nginx")
    listing = work / "urls.txt"
    listing.write_text("".join(f"{origin.base_url}/f{i}.bin\n" for i in range(args.files)))
    total_mb = args.files * args.size / 1e6
    rows: list[tuple[str, float, int, str]] = []
    try:
        env = default_env()
        job = [sys.executable, "-m", "producer", str(listing), "-d", str(work / "out")]
        for label in ("first run", "re-run, files untouched", "re-run, every file touched"):
            if label.startswith("re-run, every"):
                for path in (work / "out").iterdir():
                    if path.is_file():
                        os.utime(path)
            seconds, read, out = timed(job, env, ROOT)
            summary = next((line for line in out.splitlines() if line.startswith("summary:")), "")
            rows.append((f"fleetfetch local, defaults: {label}", seconds, read, summary.strip()))
        if shutil.which("aria2c"):
            aria = ["aria2c", "-q", "-j16", "-i", str(listing), "-d", str(work / "aria2"), "--conditional-get=true",
                    "--remote-time=true", "--allow-overwrite=true", "--auto-file-renaming=false"]
            for label in ("first run", "re-run, files untouched"):
                seconds, read, _ = timed(aria, os.environ.copy(), work)
                rows.append((f"aria2c -j16 --conditional-get: {label}", seconds, read, ""))
    finally:
        origin.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.files} files x {args.size} B ({total_mb:.0f} MB) from {type(origin).__name__} on 127.0.0.1")
    print(f"{'run':60} {'seconds':>8} {'MB read':>8}  summary")
    for label, seconds, read, summary in rows:
        print(f"{label:60} {seconds:8.2f} {read / 1e6:8.1f}  {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
