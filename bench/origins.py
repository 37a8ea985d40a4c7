"""Origins on 127.0.0.1: nginx for plain files when installed, the Python origin for the WAN-like case."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import requests

from bench.realparts.origin import Origin
from bench.realparts.servers import free_port

NGINX_CONF = """daemon off;
worker_processes 2;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  client_body_temp_path {prefix}/tmp;
  server {{ listen 127.0.0.1:{port}; {site} }}
}}
"""


class Nginx:
    """nginx on 127.0.0.1 serving the files under `root`, or `site` (the inside of its server block) instead."""

    def __init__(self, root: Path | None, prefix: Path, site: str | None = None) -> None:
        self.port = free_port()
        prefix.mkdir(parents=True, exist_ok=True)
        (prefix / "tmp").mkdir(exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=self.port, site=site or f"root {root};"))
        self.proc = subprocess.Popen([shutil.which("nginx") or "nginx", "-c", str(conf), "-p", str(prefix)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                requests.get(self.base_url + "/", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("nginx did not start")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class PythonOrigin:
    """Serves a directory with an optional first-byte delay and per-connection rate (WAN-like)."""

    def __init__(self, root: Path, delay: float = 0.0, rate: float | None = None) -> None:
        self.origin = Origin("127.0.0.1")
        for f in root.iterdir():
            self.origin.add("/" + f.name, f.read_bytes(), delay=delay, rate=rate)
        self.origin.start()
        self.base_url = self.origin.base_url

    def stop(self) -> None:
        self.origin.stop()


def plain_origin(root: Path, prefix: Path) -> Nginx | PythonOrigin:
    return Nginx(root, prefix) if shutil.which("nginx") else PythonOrigin(root)
