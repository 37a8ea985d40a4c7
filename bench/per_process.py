"""The approach fleetfetch replaces: one process per URL, whole body in memory, no retries, no record.

    python bench/per_process.py URLS_FILE OUT_DIR
"""

from __future__ import annotations

import sys
from multiprocessing import Process
from pathlib import Path

import requests


def download(url: str, out: Path) -> None:
    r = requests.get(url)
    (out / url.rsplit("/", 1)[-1]).write_bytes(r.content)


def main(listing: str, out: str) -> None:
    urls = Path(listing).read_text().split()
    procs = [Process(target=download, args=(u, Path(out))) for u in urls]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
