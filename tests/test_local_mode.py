"""Local mode: no broker configured -> embedded server + real worker, started and stopped by the producer."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import subprocess
import sys
import threading
import time

import psutil

from tests.conftest import ROOT, base_env, read_manifest, write_list


class Spawned:
    """Watches a process tree and remembers every descendant it ever had."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pids: set[int] = set()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.pids.update(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))
            time.sleep(0.05)

    def survivors(self) -> list[int]:
        self._thread.join(5)
        alive = [p for p in self.pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        return alive


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
                            env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watch = Spawned(proc)
    deadline = time.monotonic() + 30
    while not origin.requests_for("/slow.bin") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert origin.requests_for("/slow.bin"), "the download never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err
    assert watch.survivors() == []
    target = tmp_path / "downloads" / "slow.bin"
    assert not target.exists() or target.read_bytes() == body  # never a partial file under the final name
