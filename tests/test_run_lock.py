"""One process per run directory: a second one is refused with one line, a dead owner's lock is taken over."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cl_runner.errors import RunDirectoryBusy
from cl_runner.run_lock import LOCK_FILE, RunLock
from conftest import REPO, SMOKE, run_cli

ONE_TASK = [*SMOKE, "task_sequence.tasks=[second_word,third_word]", "trainer.max_steps=3"]


def start_paused(run_dir, cwd):
    """A real cl-runner on ``run_dir``, stopped inside the first task's second step; returns (process, release file)."""
    marker, release = cwd / "paused.marker", cwd / "release"
    env = {**os.environ, "CL_RUNNER_TEST_AT": "second_word:2", "CL_RUNNER_TEST_DO": f"pause:{marker}:{release}", "PYTHONWARNINGS": "ignore"}
    output = open(cwd / "first.log", "w")  # a file, not a pipe: nobody reads while it is paused
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "hooked_cli.py"), *ONE_TASK, f"hydra.run.dir={run_dir}"],
        cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, (cwd / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "the first process never reached its second step"
        time.sleep(0.05)
    return proc, release


def test_second_process_on_a_running_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first, release = start_paused(run_dir, tmp_path)
    snapshot = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (run_dir / ".hydra").iterdir()}
    try:
        # Another command on the same directory: refused by the lock, before its settings are even compared.
        second = run_cli([*ONE_TASK, "trainer.num_threads=1", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        lines = [l for l in second.stderr.splitlines() if l.strip()]
        assert second.returncode == 2, second.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("cl-runner: error: "), second.stderr
        assert f"is in use by another cl-runner (pid {first.pid} on {socket.gethostname()}" in lines[0]
        owner = json.loads((run_dir / LOCK_FILE).read_text())
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        assert {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (run_dir / ".hydra").iterdir()} == snapshot
        assert not (run_dir / "error.txt").exists()
    finally:
        release.touch()
    first.wait(timeout=240)
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["acc_matrix"]) == 3
    steps = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "start" for e in steps) == 1  # the refused process wrote nothing
    assert (run_dir / LOCK_FILE).read_text() == ""  # a clean exit leaves the lock file empty


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    first, _ = start_paused(run_dir, tmp_path)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid  # left behind by the dead owner
    again = run_cli([*ONE_TASK, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Taking over {run_dir / LOCK_FILE} from pid {first.pid} on {socket.gethostname()}" in again.stdout + again.stderr
    assert json.loads((run_dir / "results.json").read_text())["acc_matrix"]


def test_two_locks_in_one_process_exclude_each_other(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunDirectoryBusy, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit: free again
        pass


@pytest.fixture
def no_flock(monkeypatch):
    import fcntl

    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)


def write_owner(run_dir, host, pid):
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "since": "earlier"}))


def test_without_flock_a_dead_owner_on_this_host_is_taken_over(tmp_path, no_flock, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_owner(tmp_path, socket.gethostname(), dead.pid)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"from pid {dead.pid}" in caplog.text


def test_without_flock_a_live_owner_or_another_host_is_respected(tmp_path, no_flock):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_owner(tmp_path, socket.gethostname(), alive.pid)
        with pytest.raises(RunDirectoryBusy, match=f"pid {alive.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        alive.kill()
        alive.wait()
    write_owner(tmp_path, "some-other-node", 12345)
    with pytest.raises(RunDirectoryBusy, match="no flock .* delete"):
        RunLock(tmp_path).acquire()
