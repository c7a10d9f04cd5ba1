"""Sweeps through hydra-submitit-launcher on a real SLURM: the one-node cluster of
scripts/local_slurm.sh (Debian's slurm-wlm and munge), started once for these tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import QUIET, REPO, run_cli

SCRIPT = REPO / "scripts" / "local_slurm.sh"


def _cannot_run_slurm() -> str | None:
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return "hydra-submitit-launcher is not installed (pip install -e .[slurm])"
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        return "slurm-wlm is not installed and installing it needs root (bash scripts/local_slurm.sh install)"
    return None


@pytest.fixture(scope="module")
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
