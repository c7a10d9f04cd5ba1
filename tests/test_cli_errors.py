"""Bad input through the real CLI: one clear line, non-zero exit, no traceback, nothing to resume from."""

import json

import pytest

from conftest import QUIET, run_cli

GOOD_SENTIMENT = [{"text": "great film", "label": "positive"}, {"text": "dull", "label": "negative"}]


def make_custom_data(root):
    data = root / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"sentiment.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GOOD_SENTIMENT))
        (data / f"summaries.{split}.csv").write_text("article,summary\nThe cat sat on the mat all day.,A cat sat.\n")
    return data


def break_missing_file(data):
    (data / "sentiment.test.jsonl").unlink()


def break_malformed_line(data):
    (data / "sentiment.train.jsonl").write_text(json.dumps(GOOD_SENTIMENT[0]) + "\n" + '{"text": "oops", "label": \n')


def break_empty_task(data):
    (data / "sentiment.test.jsonl").write_text("")


def break_target_not_in_choices(data):
    (data / "sentiment.test.jsonl").write_text(json.dumps({"text": "meh", "label": "neutral"}) + "\n")


CASES = {
    "missing data file": (break_missing_file, r"data file 'data/sentiment.test.jsonl' for split 'test' not found"),
    "malformed jsonl": (break_malformed_line, r"sentiment.train.jsonl line 2 is not valid JSON"),
    "no examples": (break_empty_task, r"split 'test' has no examples"),
    "target not in choices": (break_target_not_in_choices, r"line 1: target 'neutral' is not among its choices \['positive', 'negative'\]"),
}


def assert_one_clear_line(result, pattern):
    import re

    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cl-runner: error: ")
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_task_data(case, tmp_path):
    breaker, pattern = CASES[case]
    breaker(make_custom_data(tmp_path))
    result = run_cli(["task_sequence=custom_files", "model=tiny", "logger=none", *QUIET], cwd=tmp_path)
    assert_one_clear_line(result, pattern)
    assert result.returncode == 2
    assert not list(tmp_path.rglob("state.json")) and not list(tmp_path.rglob("results.json"))


def test_unknown_config_option(tmp_path):
    result = run_cli(["method=no_such_method"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Could not find 'method/no_such_method'" in result.stderr
    assert "seq_lora" in result.stderr  # Hydra lists the available options


def test_misspelled_key(tmp_path):
    result = run_cli(["trainer.lrr=0.1"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "Key 'lrr' is not in struct" in result.stderr


def test_required_value_missing(tmp_path):
    result = run_cli(["model=hf", "logger=none", *QUIET], cwd=tmp_path, timeout=120)
    assert_one_clear_line(result, r"'model.name_or_path' is required but not set")


def test_rerun_with_other_settings_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    short = ["task_sequence.tasks=[second_word]", "trainer.max_steps=1", "~eval.suites"]  # the same in both: not reported as changed
    first = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}", "task_sequence.eval_size=2", *short, *QUIET], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}", "trainer.lr=0.5", *short, *QUIET], cwd=tmp_path)
    assert_one_clear_line(second, r"holds a run with other settings \(task_sequence.eval_size: 2 -> 8, trainer.lr: 0.002 -> 0.5\)")


def test_an_unset_setting_equals_an_absent_one_but_a_value_does_not():
    """Settings added later and off by default (rollback: [], eval.suites: {}) leave older run directories resumable."""
    from cl_runner.run_state import changed_settings

    before = {"trainer.lr": 0.002, "rollback": None}
    assert changed_settings(before, {"trainer.lr": 0.002, "rollback": []}) == []
    assert changed_settings(before, {"trainer.lr": 0.002}) == []
    assert changed_settings(before, {"trainer.lr": 0.002, "rollback": ["a"]}) == ["rollback"]
    assert changed_settings(before, {"trainer.lr": 0.002, "rollback": None, "eval.suites.x.size": 4}) == ["eval.suites.x.size"]
    assert changed_settings({"trainer.max_steps": 0}, {"trainer.max_steps": None}) == ["trainer.max_steps"]  # 0 is a value
    # stored before trainer.sharding became resume-safe: a run directory of then resumes now
    assert changed_settings({"trainer.lr": 0.002, "trainer.sharding": "none"}, {"trainer.lr": 0.002}) == []


def test_custom_files_sequence_runs_on_user_data(tmp_path):
    """The same template, with good files: a user's own JSONL and CSV tasks run without Python."""
    make_custom_data(tmp_path)
    result = run_cli(["task_sequence=custom_files", "model=tiny", "logger=none", "trainer.max_steps=2", "task_sequence.probe_size=4", *QUIET], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert results["tasks"] == ["my_sentiment", "my_summaries"]
    assert len(results["acc_matrix"]) == 3 and len(results["general"]) == 3


@pytest.mark.parametrize("override,pattern", [("trainer.precision=fp8", r"trainer.precision 'fp8' is not one of"), ("trainer.batch_size=0", r"trainer.batch_size must be a positive integer"),
                                            ("trainer.checkpoint_every=0", r"trainer.checkpoint_every must be null or a positive integer")])
def test_bad_trainer_setting_fails_before_anything_is_written(override, pattern, tmp_path):
    result = run_cli(["experiment=smoke", override, *QUIET], cwd=tmp_path, timeout=120)
    assert_one_clear_line(result, pattern)
    assert not list(tmp_path.rglob("state.json"))


def test_rerun_with_only_resume_safe_changes_is_accepted(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}", "task_sequence.tasks=[second_word]", *QUIET], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}", "task_sequence.tasks=[second_word]", "trainer.num_threads=1", "trainer.log_every=3", "logger=wandb", "logger.mode=disabled"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is complete" in again.stderr + again.stdout


def test_bad_device_name(tmp_path):
    result = run_cli(["experiment=smoke", "trainer.device=gpu0", *QUIET], cwd=tmp_path, timeout=120)
    assert_one_clear_line(result, r"trainer.device 'gpu0' is not a device name")


def test_run_directory_of_an_older_format_is_refused(tmp_path):
    """Rows scored the old way (choices without end-of-turn, other truncation) must not be continued with new ones."""
    run_dir = tmp_path / "run"
    first = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}", "task_sequence.eval_size=2", "trainer.max_steps=1", *QUIET], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    state = json.loads((run_dir / "state.json").read_text())
    del state["settings"]["cl_runner_format"]  # what an older cl-runner wrote
    state["acc_matrix"] = state["acc_matrix"][:2]
    (run_dir / "state.json").write_text(json.dumps(state))
    second = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}", "task_sequence.eval_size=2", "trainer.max_steps=1", *QUIET], cwd=tmp_path)
    assert_one_clear_line(second, r"was written by another version of cl-runner, which scores tasks differently")


# One case per family of user error raised inside a target Hydra instantiates (model loaders,
# replay, methods, loggers): each must reach the user as the same single line, exit 2.
INSTANTIATED = {
    "model package missing": (["experiment=smoke", "model.loader.tokenizer_package=no_such_pkg"], {}, r"model package 'no_such_pkg' is not installed"),
    "model directory missing": (["model=hf", "model.name_or_path=/nonexistent/model"], {}, r"model directory '/nonexistent/model' not found"),
    "hub id unreachable": (["model=hf", "model.name_or_path=some-org/some-model"], {"HF_HUB_OFFLINE": "1"}, r"could not load model 'some-org/some-model': .*local copy"),
    "replay setting": (["experiment=smoke", "replay=instruction", "replay.ratio=2"], {}, r"replay.ratio must be a number in \(0, 1\), got 2"),
    "method setting": (["experiment=smoke", "+method.peft.rank=8"], {}, r"method.peft: peft.LoraConfig: .*unexpected keyword argument 'rank'"),
    "logger setting": (["experiment=smoke", "logger=wandb", "logger.mode=sometimes"], {}, r"logger.mode 'sometimes' is not one of"),
    "unknown target argument": (["experiment=smoke", "logger=wandb", "+logger.colour=red"], {}, r"logger: bad settings for cl_runner.loggers.WandbLogger \(.*'colour'"),
}


@pytest.mark.parametrize("case", sorted(INSTANTIATED))
def test_errors_inside_instantiated_targets_are_one_line(case, tmp_path):
    args, env, pattern = INSTANTIATED[case]
    result = run_cli([*args, *QUIET], cwd=tmp_path, env=env, timeout=180)
    assert_one_clear_line(result, pattern)
    assert result.returncode == 2
    assert not list(tmp_path.rglob("state.json")) and not list(tmp_path.rglob("results.json"))


def test_sweep_runs_its_good_jobs_and_reports_the_bad_one(tmp_path):
    result = run_cli(["-m", "experiment=smoke", "trainer.lr=0.001,-1,0.002", "task_sequence.tasks=[second_word]", *QUIET], cwd=tmp_path, timeout=400)
    assert result.returncode == 1, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "multirun"
    for lr in ("0.001", "0.002"):
        done = sweep / f"experiment=smoke,task_sequence.tasks=[second_word],trainer.lr={lr}"
        assert json.loads((done / "results.json").read_text())["config"]["trainer"]["lr"] == float(lr)
        assert not (done / "error.txt").exists()
    bad = sweep / "experiment=smoke,task_sequence.tasks=[second_word],trainer.lr=-1"
    assert (bad / "error.txt").read_text() == "trainer.lr must be a positive number, got -1\n"
    assert not (bad / "state.json").exists()
    errors = [l for l in result.stderr.splitlines() if l.startswith("cl-runner: ")]
    assert errors == [
        f"cl-runner: error: job {bad}: trainer.lr must be a positive number, got -1",
        f"cl-runner: 1 of 3 jobs failed: {bad}",
    ]
    assert "Traceback" not in result.stderr


def test_rerun_on_edited_data_is_refused_naming_the_task(tmp_path):
    data = make_custom_data(tmp_path)
    args = ["task_sequence=custom_files", "model=tiny", "logger=none", "trainer.max_steps=1", "task_sequence.probe_size=2", "task_sequence.eval_size=1", "hydra.run.dir=run", *QUIET]
    first = run_cli(args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert set(state["data"]) == {"my_sentiment", "my_summaries", "general_probe"}
    (data / "summaries.train.csv").write_text("article,summary\nThe dog ran.,A dog ran.\n")
    second = run_cli(args, cwd=tmp_path)
    assert_one_clear_line(second, r"task 'my_summaries': its train data differs from what run directory .* was trained and scored on")
    assert second.returncode == 2


def test_rerun_from_a_directory_where_relative_paths_resolve_elsewhere_is_refused(tmp_path):
    """The run directory is given absolutely; the data files are relative to where cl-runner runs."""
    first_cwd, second_cwd = tmp_path / "a", tmp_path / "b"
    for cwd in (first_cwd, second_cwd):
        cwd.mkdir()
        make_custom_data(cwd)
    (second_cwd / "data" / "sentiment.test.jsonl").write_text(json.dumps({"text": "fine", "label": "positive"}) + "\n")
    args = ["task_sequence=custom_files", "model=tiny", "logger=none", "trainer.max_steps=1", "task_sequence.probe_size=2", f"hydra.run.dir={tmp_path / 'run'}", *QUIET]
    first = run_cli(args, cwd=first_cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_cli(args, cwd=second_cwd)
    assert_one_clear_line(second, r"task 'my_sentiment': its test data differs")


def test_debug_shows_the_traceback_and_keeps_exit_status_2(tmp_path):
    result = run_cli(["experiment=smoke", "replay=instruction", "replay.ratio=2", *QUIET], cwd=tmp_path, env={"CL_RUNNER_DEBUG": "1"}, timeout=120)
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr and "cl_runner/replay.py" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "cl-runner: error: replay.ratio must be a number in (0, 1), got 2"
