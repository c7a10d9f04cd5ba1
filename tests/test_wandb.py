"""W&B follows the run: one run id per run directory, resumed with continuing steps; a failure only warns, once."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from cl_runner.runner import EventLog, run
from conftest import REPO, SMOKE, compose_config
from wandb_records import history_and_ids

TWO_TASKS = [*SMOKE, "logger=wandb", "task_sequence.tasks=[second_word,last_word]"]


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_offline_logger_writes_one_run_with_every_record(tmp_path, caplog):
    caplog.set_level("INFO", logger="cl_runner.loggers")
    run(compose_config(TWO_TASKS), tmp_path)
    [only] = offline_runs(tmp_path)
    steps, ids = history_and_ids(only)
    assert ids == {json.loads((tmp_path / "wandb_run.json").read_text())["id"]}
    events = (tmp_path / "train_log.jsonl").read_text().splitlines()
    logged = [i for i, line in enumerate(events) if json.loads(line)["event"] in ("train_step", "eval")]
    # Each record is logged at its line number in train_log.jsonl; the results come last.
    assert steps == [*logged, len(events)]
    run_id = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    assert f"wandb sync --id {run_id} {tmp_path / 'wandb'}/offline-run-*" in caplog.text


def wandb_histories(run_dir):
    """The history steps of each invocation's offline file, in invocation order; checks they share the stored run id."""
    run_id = json.loads((run_dir / "wandb_run.json").read_text())["id"]
    files = offline_runs(run_dir)
    assert len(files) == 2  # one offline folder per invocation...
    histories = []
    for path in sorted(files, key=lambda p: p.parent.name):  # offline-run-<start time>-<id>
        steps, ids = history_and_ids(path)
        assert ids <= {run_id}  # ...under the same run id, so `wandb sync --id` makes them one run
        histories.append((steps, ids))
    return histories


def logged_lines(run_dir):
    """Line numbers of the records W&B receives (train steps, evaluations, then the results), and of the last start."""
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    logged = {i for i, event in enumerate(lines) if event["event"] in ("train_step", "eval")} | {len(lines)}
    return logged, max(i for i, event in enumerate(lines) if event["event"] == "start")


def test_run_interrupted_and_resumed_is_one_wandb_run_with_monotone_steps(tmp_path, monkeypatch):
    """A crash in the second task (the W&B run is closed as failed), then a rerun on another thread count."""
    original = EventLog.step

    def crash_in_second_task(self, task_name, record):
        original(self, task_name, record)
        if task_name == "last_word" and record["step"] == 2:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(EventLog, "step", crash_in_second_task)
    with pytest.raises(RuntimeError):
        run(compose_config(TWO_TASKS), tmp_path)
    monkeypatch.setattr(EventLog, "step", original)
    threads = torch.get_num_threads()
    try:
        results = run(compose_config([*TWO_TASKS, "trainer.num_threads=1"]), tmp_path)  # resume-safe: allowed, recorded
    finally:
        torch.set_num_threads(threads)

    (first, first_ids), (second, second_ids) = wandb_histories(tmp_path)
    assert first_ids == second_ids and first_ids  # both files name the run
    logged, restart = logged_lines(tmp_path)
    assert first == sorted(s for s in logged if s < restart)  # each record at its line number in train_log.jsonl
    assert second == sorted(s for s in logged if s > restart)  # continuing after the last step before the crash
    invocations = results["invocations"]
    assert [i["tasks_completed_at_start"] for i in invocations] == [0, 1]
    assert invocations[1]["num_threads"] == 1 and invocations[0]["num_threads"] == threads
    assert all(i["device"] == "cpu" and i["versions"]["torch"] for i in invocations)


def test_run_killed_and_resumed_continues_the_same_wandb_run(tmp_path):
    """SIGKILL in the second task: no clean W&B shutdown, and W&B may lose what its writer had buffered
    (train_log.jsonl has everything); the rerun resumes the same run id after the kill's last line."""
    run_dir = tmp_path / "run"
    args = [*TWO_TASKS, f"hydra.run.dir={run_dir}"]
    # A W&B service inherited from the parent (here: a dead one) must not be used: cl-runner starts its own.
    env = {**os.environ, "WANDB_SERVICE": "3-99999-tcp-localhost-1"}
    killed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "hooked_cli.py"), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**env, "CL_RUNNER_TEST_AT": "last_word:2", "CL_RUNNER_TEST_DO": "kill"},
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "cl_runner", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "W&B start failed" not in resumed.stdout + resumed.stderr  # the run id was free to resume

    (first, _), (second, second_ids) = wandb_histories(run_dir)
    assert second_ids == {json.loads((run_dir / "wandb_run.json").read_text())["id"]}
    logged, restart = logged_lines(run_dir)
    assert set(first) <= {s for s in logged if s < restart}
    assert second == sorted(s for s in logged if s > restart)


def test_bad_logger_setting_is_a_user_error(tmp_path):
    from cl_runner.errors import UserError

    with pytest.raises(UserError, match="logger.mode 'not_a_mode' is not one of"):
        run(compose_config([*SMOKE, "logger=wandb", "logger.mode=not_a_mode"]), tmp_path)
    assert not (tmp_path / "state.json").exists()


def test_wandb_failure_mid_run_warns_once_and_files_complete(tmp_path, caplog):
    from wandb.sdk.wandb_run import Run

    calls = []

    def disk_full(self, *args, **kwargs):
        calls.append(args)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "log", disk_full)
        results = run(compose_config(TWO_TASKS), tmp_path)
    warnings = [r for r in caplog.records if "W&B" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0].getMessage()
    assert len(calls) == 1  # switched off after the first failure
    assert len(results["acc_matrix"]) == 3 and (tmp_path / "results.json").exists()


def test_online_mode_without_a_reachable_server_warns_once(tmp_path, caplog, monkeypatch):
    """No network (or, where there is one, a key the server rejects): init fails, the run goes on with files."""
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    results = run(compose_config([*TWO_TASKS, "logger.mode=online", "logger.entity=nobody", "logger.init_timeout=3"]), tmp_path)
    warnings = [r for r in caplog.records if "W&B" in r.getMessage()]
    assert len(warnings) == 1 and "W&B start failed" in warnings[0].getMessage()
    assert len(results["acc_matrix"]) == 3
