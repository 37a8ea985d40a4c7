"""Serve a directory's files on HOST:PORT at RATE bytes/s per connection: an origin for namespaced hosts.

    python -m tests.support.slow_static HOST PORT DIR RATE
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from bench.realparts.origin import Origin


def main(host: str, port: str, directory: str, rate: str) -> None:
    origin = Origin(host, int(port))
    for f in Path(directory).iterdir():
        origin.add("/" + f.name, f.read_bytes(), rate=float(rate))
    origin.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(*sys.argv[1:5])
