"""Sweeps through hydra-submitit-launcher on a real SLURM: the one-node cluster of
scripts/local_slurm.sh (Debian's slurm-wlm and munge), started once for these tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import DATA_PARALLEL, QUIET, REPO, run_cli, train_log

# One local cluster for all of these: under pytest-xdist one worker runs them (--dist loadgroup).
pytestmark = pytest.mark.xdist_group("slurm")

SCRIPT = REPO / "scripts" / "local_slurm.sh"


def _cannot_run_slurm() -> str | None:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install -e .[slurm])"
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        return "slurm-wlm is not installed and installing it needs root (bash scripts/local_slurm.sh install)"
    return None


# Session scope: under pytest-xdist this module's tests may come interleaved with others', and a
# module fixture would stop and restart the cluster between them (its port still held).
@pytest.fixture(scope="session")
def slurm_env(tmp_path_factory):
    reason = _cannot_run_slurm()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "CL_RUNNER_SLURM_DIR": str(state)}
    started = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        pytest.skip(f"the local SLURM cluster did not start: {started.stderr.strip()[-300:]}")
    yield {"SLURM_CONF": str(state / "slurm.conf"), "CL_RUNNER_SLURM_DIR": str(state)}
    subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=120)


def test_a_two_job_sweep_runs_as_slurm_jobs(slurm_env, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=slurm", "experiment=smoke", *QUIET, "logger=none", "seed=0,1", f"hydra.sweep.dir={sweep_dir}",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "trainer.num_threads=1"]
    result = run_cli(args, tmp_path, timeout=600, env=slurm_env)
    assert result.returncode == 0, result.stderr[-3000:]
    job_ids = set()
    for seed in (0, 1):
        results = json.loads((sweep_dir / f"experiment=smoke,seed={seed}" / "results.json").read_text())
        assert len(results["acc_matrix"]) == len(results["tasks"]) + 1
        assert results["config"]["seed"] == seed
        [invocation] = results["invocations"]
        assert invocation["slurm_job_id"]  # it ran inside a SLURM job, not in the submitting process
        job_ids.add(invocation["slurm_job_id"])
    assert len(job_ids) == 2


# Two ways a running job is stopped and queued again: `scontrol requeue` (SIGTERM, then SIGKILL:
# what a preemption that requeues does), and the signal SLURM sends `signal_delay_s` before the
# time limit (USR2), on which submitit's handler resubmits the job itself (hydra-submitit-launcher's
# checkpoint()) and requeues it.
INTERRUPTIONS = {"scontrol_requeue": lambda job: ["scontrol", "requeue", job], "time_limit_signal": lambda job: ["scancel", "--signal=USR2", job]}


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_a_requeued_job_resumes_and_ends_as_an_uninterrupted_run(slurm_env, tmp_path, interruption):
    """The stopped job runs again in the same run directory and resumes from its last step checkpoint."""
    base = ["experiment=smoke", *QUIET, "logger=none", "trainer.num_threads=1", "trainer.max_steps=160", "trainer.epochs=40", "trainer.checkpoint_every=5",
            "task_sequence.tasks=[second_word,third_word,last_word]"]
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "cl_runner", "-m", "hydra/launcher=slurm", *base, "seed=0", f"hydra.sweep.dir={sweep_dir}",
               "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **slurm_env}
    sweep = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (written := list(sweep_dir.glob("*/checkpoints/in_progress.pt"))):  # inside a task, a step checkpoint written
        assert sweep.poll() is None and time.time() < deadline, "the job never reached a mid-task checkpoint"
        time.sleep(0.05)
    run_dir = written[0].parents[1]
    # This test's job: submitted from its own folder (another test's job may still be leaving the queue).
    queue = subprocess.run(["squeue", "-h", "-o", "%i %Z"], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    [job] = [line.split()[0] for line in queue if line.split()[1:] == [str(tmp_path)]]
    subprocess.run(INTERRUPTIONS[interruption](job), env=env, check=True, capture_output=True)
    # SLURM holds a job requeued while it was still completing for 120 s (BeginTime): start it now.
    for _ in range(200):
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], env=env, capture_output=True, text=True).stdout.split()
        if state[:2] == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True, capture_output=True)
            break
        if state[:1] == ["RUNNING"] and len(list(run_dir.glob("cl-runner.log"))) and "Resuming" in (run_dir / "cl-runner.log").read_text():
            break
        time.sleep(0.1)
    output, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, output[-3000:]

    clean = run_cli([*base, "seed=0", f"hydra.run.dir={tmp_path / 'clean'}"], tmp_path, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    got = json.loads((run_dir / "results.json").read_text())
    want = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert len(got["invocations"]) == 2 and len({i["slurm_job_id"] for i in got["invocations"]}) == 1  # the same job, run twice
    assert got["acc_matrix"] == want["acc_matrix"] and got["general"] == want["general"]
    assert [s["final_loss"] for s in got["train"]] == [s["final_loss"] for s in want["train"]]
    # The second run resumed inside the task it was killed in, from its last step checkpoint (every 5 steps).
    events = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    restart = [i for i, e in enumerate(events) if e["event"] == "start"][1]
    first = next(e for e in events[restart:] if e["event"] == "train_step")
    logged = max([e["step"] for e in events[:restart] if e["event"] == "train_step" and e["task"] == first["task"]], default=0)
    # A step checkpoint every 5 steps, except at the task's last (160th) step, whose state goes with the task's own
    # checkpoint: a job stopped after logging step 160 but before that checkpoint resumes after step 155.
    saved = min(logged, 159) // 5 * 5
    assert first["step"] == saved + 1 or ((logged + 1) % 5 == 0 and first["step"] == logged + 2)  # or killed between save and log


def test_a_two_task_slurm_job_trains_data_parallel(slurm_env, tmp_path):
    """`hydra.launcher.tasks_per_node=2`: submitit starts two processes, which join one process group
    from SLURM's variables and train as two ranks at batch 4, following one process at batch 8."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=slurm", *DATA_PARALLEL, "logger=none", "trainer.batch_size=4", f"hydra.sweep.dir={sweep_dir}",
            "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]
    result = run_cli(args, tmp_path, timeout=600, env=slurm_env)
    assert result.returncode == 0, result.stderr[-3000:]
    single = run_cli([*DATA_PARALLEL, "trainer.batch_size=8", "hydra.run.dir=single"], tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    [run_dir] = [p.parent for p in sweep_dir.glob("*/results.json")]
    events, losses = train_log(run_dir)
    events_single, losses_single = train_log(tmp_path / "single")
    assert events == events_single  # one writer
    assert losses == pytest.approx(losses_single, rel=1e-5)
    assert json.loads((run_dir / "results.json").read_text())["acc_matrix"] == json.loads((tmp_path / "single" / "results.json").read_text())["acc_matrix"]
