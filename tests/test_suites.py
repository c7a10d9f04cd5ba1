"""General-ability suites (eval.suites): scored on every row, stored per row with their change from the base model."""

from __future__ import annotations

import json

import pytest

from cl_runner.config import compose_config
from cl_runner.errors import UserError
from cl_runner.evaluation.instruction_following import InstructionFollowingSuite
from cl_runner.runner import run
from conftest import SMOKE

SCRIPT = [0.5, 0.4, 0.45, 0.2, 0.1]  # one value per row: base + 4 tasks
CALLS: list = []


class ScriptedSuite:
    """Answers from SCRIPT in row order and records how the runner called it."""

    headline = "score"

    def __init__(self, label: str = "x"):
        self.label = label
        self.row = 0

    def setup(self, model, formatter, device, batch_size):
        CALLS.append(("setup", model.training))

    def score(self, model, formatter, members, device, batch_size):
        CALLS.append(("score", model.training, len(members)))
        value = SCRIPT[self.row]
        self.row += 1
        return {"score": value, "twice": 2 * value}


def test_each_row_stores_every_suite_score_and_its_change_from_the_base_model(tmp_path):
    CALLS.clear()
    cfg = compose_config([*SMOKE, "+eval.suites.scripted._target_=test_suites.ScriptedSuite", "+eval.suites.scripted.label=y"])
    results = run(cfg, tmp_path)
    assert results["abilities"]["scripted"] == {"score": SCRIPT, "twice": [2 * v for v in SCRIPT]}
    assert results["abilities_delta"]["scripted"]["score"] == pytest.approx([0.0, -0.1, -0.05, -0.3, -0.4])
    assert set(results["abilities"]) == {"scripted", "instruction_following"}  # the default suite runs as well
    assert len(results["abilities"]["instruction_following"]["prompt_level_strict_acc"]) == 5
    assert CALLS[0][0] == "setup" and [c[0] for c in CALLS[1:]] == ["score"] * 5
    assert all(not c[1] for c in CALLS if c[0] == "score")  # scored in eval mode (no dropout)
    events = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["abilities"]["scripted"]["score"] for e in events if e["event"] == "eval"] == SCRIPT
    assert (tmp_path / "abilities.png").stat().st_size > 0
    state = json.loads((tmp_path / "state.json").read_text())
    assert [row["scripted"]["score"] for row in state["abilities"]] == SCRIPT  # kept for a resume


def test_a_run_without_suites_has_empty_abilities(tmp_path):
    results = run(compose_config([*SMOKE, "~eval.suites.instruction_following"]), tmp_path)
    assert results["abilities"] == {} and results["abilities_delta"] == {}
    assert not (tmp_path / "abilities.png").exists()


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "Hi", "instruction_id_list": ["made_up:kind"], "kwargs": [{}]}', "unknown instruction"),
    ("not json", "Expecting value"),
])
def test_a_bad_instruction_file_is_one_clear_error(tmp_path, line, message):
    data = tmp_path / "if.jsonl"
    data.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        InstructionFollowingSuite(data=str(data))
    with pytest.raises(UserError, match="no file"):
        InstructionFollowingSuite(data=str(tmp_path / "missing.jsonl"))
