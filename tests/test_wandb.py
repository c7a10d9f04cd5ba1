"""W&B follows the run: one run id per run directory, resumed with continuing steps; a failure only warns, once."""

import errno
import json

import pytest
import torch

from cl_runner.runner import EventLog, run
from conftest import SMOKE, compose_config
from wandb_records import history_and_ids

TWO_TASKS = [*SMOKE, "logger=wandb", "task_sequence.tasks=[second_word,last_word]"]


class Interrupted(Exception):
    pass


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


def test_resumed_run_is_one_wandb_run_with_monotone_steps(tmp_path, monkeypatch):
    original = EventLog.step

    def interrupt_in_second_task(self, task_name, record):
        original(self, task_name, record)
        if task_name == "last_word" and record["step"] == 2:
            raise Interrupted

    monkeypatch.setattr(EventLog, "step", interrupt_in_second_task)
    with pytest.raises(Interrupted):
        run(compose_config(TWO_TASKS), tmp_path)
    monkeypatch.setattr(EventLog, "step", original)
    threads = torch.get_num_threads()
    try:
        results = run(compose_config([*TWO_TASKS, "trainer.num_threads=1"]), tmp_path)  # resume-safe: allowed, recorded
    finally:
        torch.set_num_threads(threads)

    files = offline_runs(tmp_path)
    assert len(files) == 2  # one offline folder per invocation...
    run_id = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    histories = []
    for path in files:
        steps, ids = history_and_ids(path)
        assert ids == {run_id}  # ...both under the same run id, so `wandb sync` makes them one run
        histories.append(steps)
    first, second = sorted(histories, key=lambda steps: steps[0])
    assert first == sorted(set(first)) and second == sorted(set(second))
    assert second[0] > first[-1]  # the resumed invocation continues after the last step logged before the kill

    invocations = results["invocations"]
    assert [i["tasks_completed_at_start"] for i in invocations] == [0, 1]
    assert invocations[1]["num_threads"] == 1 and invocations[0]["num_threads"] == threads
    assert all(i["device"] == "cpu" and i["versions"]["torch"] for i in invocations)


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
