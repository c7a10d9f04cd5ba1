"""Failures recorded instead of raised: sweep jobs, and error.txt (the CLI sweep itself: test_cli_errors.py)."""

import json

import pytest

from cl_runner import sweep
from cl_runner.errors import RunDirectoryBusy, UserError
from cl_runner.runner import run
from conftest import SMOKE, compose_config


@pytest.fixture(autouse=True)
def fresh_outcomes(monkeypatch):
    monkeypatch.setattr(sweep, "OUTCOMES", [])
    monkeypatch.delenv("CL_RUNNER_DEBUG", raising=False)


def fail(exc):
    def job():
        raise exc

    return job


def test_a_crash_is_reported_with_its_type_and_the_sweep_goes_on(tmp_path, capsys):
    sweep.run_job(fail(RuntimeError("CUDA out of memory\nmore detail")), tmp_path / "a")
    sweep.run_job(lambda: None, tmp_path / "b")
    sweep.run_job(fail(RunDirectoryBusy("run directory c is in use")), tmp_path / "c")
    assert capsys.readouterr().err == (
        f"cl-runner: error: job {tmp_path / 'a'}: RuntimeError: CUDA out of memory\n"
        f"cl-runner: error: job {tmp_path / 'c'}: run directory c is in use\n"
    )
    assert sweep.failure_summary() == f"cl-runner: 2 of 3 jobs failed: {tmp_path / 'a'}, {tmp_path / 'c'}"


def test_a_multi_line_user_error_is_still_one_line(tmp_path, capsys):
    sweep.run_job(fail(UserError("task 'x': the template fails\n  at line 2")), tmp_path)
    assert capsys.readouterr().err == f"cl-runner: error: job {tmp_path}: task 'x': the template fails at line 2\n"


def test_ctrl_c_ends_the_sweep(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        sweep.run_job(fail(KeyboardInterrupt()), tmp_path)


def test_all_good_means_no_summary(tmp_path):
    sweep.run_job(lambda: None, tmp_path)
    assert sweep.failure_summary() is None


def test_a_failed_run_leaves_error_txt_and_the_next_attempt_removes_it(tmp_path, monkeypatch):
    with pytest.raises(UserError):
        run(compose_config([*SMOKE, "trainer.lr=-1", "task_sequence.tasks=[second_word]"]), tmp_path)
    assert (tmp_path / "error.txt").read_text() == "trainer.lr must be a positive number, got -1\n"
    monkeypatch.setenv("CL_RUNNER_DEBUG", "1")  # the traceback follows the reason
    with pytest.raises(UserError):
        run(compose_config([*SMOKE, "trainer.lr=-2", "task_sequence.tasks=[second_word]"]), tmp_path)
    text = (tmp_path / "error.txt").read_text()
    assert text.startswith("trainer.lr must be a positive number, got -2\n") and "Traceback (most recent call last)" in text
    run(compose_config([*SMOKE, "task_sequence.tasks=[second_word]"]), tmp_path)
    assert not (tmp_path / "error.txt").exists() and (tmp_path / "results.json").exists()


def test_a_sweeps_runs_share_one_wandb_group_named_by_its_overrides(tmp_path, monkeypatch):
    from cl_runner import loggers
    from cl_runner.sweep import SWEEP_GROUP_ENV, sweep_group

    argv = ["-m", "method=seq_lora,per_task_lora", "seed=0,1", "trainer.num_threads=1", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"]
    assert sweep_group(argv) == "sweep: method=seq_lora,per_task_lora seed=0,1"  # launcher and thread settings left out
    assert sweep_group(argv[1:]) is None  # a single run has no group
    long = sweep_group(["-m", "seed=" + ",".join(map(str, range(100)))])
    assert len(long) == 128 and long != sweep_group(["-m", "seed=" + ",".join(map(str, range(101)))])

    seen = {}

    class FakeWandb:
        Settings = dict

        @staticmethod
        def init(**kwargs):
            seen.update(kwargs)

    monkeypatch.setitem(__import__("sys").modules, "wandb", FakeWandb)
    monkeypatch.setenv(SWEEP_GROUP_ENV, "sweep: seed=0,1")
    loggers.WandbLogger().start(tmp_path, "seed=0", {})
    assert seen["group"] == "sweep: seed=0,1"
    loggers.WandbLogger(group="mine").start(tmp_path, "seed=0", {})
    assert seen["group"] == "mine"  # an explicit logger.group wins


def test_a_failed_job_under_another_launcher_still_fails_the_sweep(tmp_path):
    """hydra/launcher=local runs each job in its own process; their outcomes come back through files."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed (pip install -e .[slurm])")
    from conftest import QUIET, run_cli

    stale = tmp_path / "sweep" / ".cl-runner" / "outcomes" / "an-earlier-sweep"
    stale.mkdir(parents=True)
    (stale / "x.json").write_text(json.dumps({"run_dir": str(tmp_path / "old"), "error": "old failure", "time": 4e9}))  # not this sweep's
    result = run_cli(["-m", "hydra/launcher=local", "experiment=smoke", *QUIET, "logger=none", "trainer.lr=-1,1e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"cl-runner: 1 of 2 jobs failed: {tmp_path / 'sweep' / 'experiment=smoke,trainer.lr=-1'}" in result.stderr
    assert (tmp_path / "sweep" / "experiment=smoke,trainer.lr=0.001" / "results.json").exists()
