"""cl-runner-eval: a stored run scored again from its task checkpoints, without training."""

from __future__ import annotations

import json

import pytest
import yaml

from cl_runner.config import compose_config
from cl_runner.errors import UserError
from cl_runner.eval_cli import rescore
from cl_runner.runner import run
from conftest import SMOKE

TASKS = "task_sequence.tasks=[second_word,third_word,last_word]"
FEW_SUITES = ["~eval.suites.instruction_following", "~eval.suites.code", "~eval.suites.instruction_drift", "~eval.suites.knowledge_retention"]
WEIGHTS_SUITE = ["+eval.suites.weights._target_=test_rescore.WeightsSuite"]


class WeightsSuite:
    """Scores the deployed model's weights (sum of |w| over every parameter): equal only for equal weights."""

    headline = "abs_sum"

    def setup(self, model, formatter, members, device, batch_size):
        pass

    def score(self, model, formatter, members, device, batch_size):
        with members[0]():
            return {"abs_sum": float(sum(p.detach().double().abs().sum() for p in model.parameters()))}


@pytest.mark.parametrize("method", ["per_task_lora"])  # the harder case: every adapter up to the row, the last one active
def test_rescored_rows_see_the_weights_the_run_had_at_each_row(tmp_path, method):
    scored_live = run(compose_config([*SMOKE, TASKS, *FEW_SUITES, f"method={method}", *WEIGHTS_SUITE]), tmp_path / "live")
    plain, overrides = tmp_path / "plain", [*SMOKE, TASKS, *FEW_SUITES, f"method={method}"]
    run(compose_config(overrides), plain)
    (plain / ".hydra").mkdir()
    (plain / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))  # what the CLI's snapshot holds
    before = json.loads((plain / "results.json").read_text())
    results = rescore(plain, WEIGHTS_SUITE)
    weights = results["abilities"]["weights"]["abs_sum"]
    assert weights == pytest.approx(scored_live["abilities"]["weights"]["abs_sum"], rel=1e-12)
    assert len(set(weights)) == 4  # every row its own weights (base, then after each task)
    assert results["acc_matrix"] == before["acc_matrix"] and results["general"] == before["general"]  # nothing else is redone
    assert set(results["abilities"]) == {"weights", *before["abilities"]}
    stored = json.loads((plain / "results.json").read_text())
    assert stored["abilities"]["weights"]["abs_sum"] == weights and stored["invocations"][-1]["tasks_completed_at_start"] == 3


def test_only_eval_settings_may_change_and_the_run_must_exist(tmp_path):
    with pytest.raises(UserError, match="not a cl-runner run directory"):
        rescore(tmp_path, ["eval=full"])
    with pytest.raises(UserError, match="'trainer.lr=0.1' is not an eval setting"):
        rescore(tmp_path, ["trainer.lr=0.1"])


def test_a_finished_run_without_its_checkpoints_is_complete_but_cannot_be_rescored(tmp_path):
    import shutil

    overrides = [*SMOKE, *FEW_SUITES, "task_sequence.tasks=[second_word,last_word]"]
    settings = compose_config(overrides)
    first = run(settings, tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))  # what the CLI's snapshot holds
    shutil.rmtree(tmp_path / "checkpoints")  # what a user does to save disk once a run is done
    assert run(settings, tmp_path)["acc_matrix"] == first["acc_matrix"]  # complete: nothing to do, no error
    with pytest.raises(UserError, match="re-scoring rebuilds each row from the task checkpoints, and .*task_01_second_word is gone"):
        rescore(tmp_path, [])
    (tmp_path / "results.json").unlink()  # unfinished: resuming would need the checkpoints
    with pytest.raises(UserError, match="lists checkpoints that are missing"):
        run(settings, tmp_path)
