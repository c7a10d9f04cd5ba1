"""A run killed with SIGKILL mid-task resumes after its last completed task, with identical results."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import SMOKE

# Long enough per task (tens of optimizer steps) to be killed in the middle of one.
LONGER = [*SMOKE, "trainer.max_steps=30", "task_sequence.train_size=120", "logger=none"]


def cli(run_dir, cwd):
    return [sys.executable, "-m", "cl_runner", *LONGER, f"hydra.run.dir={run_dir}"]


def steps_of(run_dir, task):
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return 0
    return sum(1 for line in log.read_text().splitlines() if line.endswith("}") and json.loads(line).get("task") == task)


def test_kill_mid_task_then_resume_matches_uninterrupted(tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(cli(killed_dir, tmp_path), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while steps_of(killed_dir, "fourth_word") < 3:  # a few steps into the third task
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached the third task"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    state = json.loads((killed_dir / "state.json").read_text())
    assert len(state["acc_matrix"]) == 3  # base + two completed tasks; the third was lost
    assert not (killed_dir / "results.json").exists()
    trained_before_kill = state["timing"]["train_s"]

    resumed = subprocess.run(cli(killed_dir, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stderr + resumed.stdout
    clean = subprocess.run(cli(clean_dir, tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]

    got = json.loads((killed_dir / "results.json").read_text())
    want = json.loads((clean_dir / "results.json").read_text())
    assert got["acc_matrix"] == want["acc_matrix"]
    assert got["metrics"] == want["metrics"]
    assert got["general"] == want["general"]
    assert got["timing"]["train_s"][:2] == trained_before_kill  # tasks 1-2 were not trained again
    assert [s["final_loss"] for s in got["train"]] == [s["final_loss"] for s in want["train"]]


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("method", ["seq_lora", "per_task_lora", "seq_ft"])
def test_every_method_resumes_to_identical_results(method, tmp_path, monkeypatch):
    """In-process: interrupt at the start of task 3, rerun, compare with an uninterrupted run."""
    from cl_runner.runner import Experiment, run
    from conftest import compose_config

    overrides = [*SMOKE, f"method={method}", "task_sequence.tasks=[second_word,third_word,last_word]"]
    want = run(compose_config(overrides), tmp_path / "clean")

    original = Experiment._learn_task

    def fail_on_third(self, t):
        if t == 2:
            raise Interrupted
        return original(self, t)

    monkeypatch.setattr(Experiment, "_learn_task", fail_on_third)
    with pytest.raises(Interrupted):
        run(compose_config(overrides), tmp_path / "resumed")
    monkeypatch.setattr(Experiment, "_learn_task", original)
    got = run(compose_config(overrides), tmp_path / "resumed")
    assert got["acc_matrix"] == want["acc_matrix"]
    assert got["metrics"] == want["metrics"]
    assert [s["final_loss"] for s in got["train"]] == [s["final_loss"] for s in want["train"]]
