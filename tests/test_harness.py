"""The lm-evaluation-harness bridge: lm-eval's simple_evaluate on the run's model, in process, offline with a local task YAML."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from cl_runner.config import compose_config
from cl_runner.errors import UserError
from cl_runner.runner import run
from conftest import SMOKE

pytest.importorskip("lm_eval", reason="lm-eval is in the test extras: pip install -e .[test]")

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo")]


def local_task(folder, name: str = "local_capitals") -> str:
    """A multiple-choice task in lm-eval's YAML format, reading a local JSONL file (no hub)."""
    data = folder / "capitals.jsonl"
    cities = [city for _, city in CAPITALS]
    data.write_text("".join(json.dumps({"question": f"The capital of {country} is", "choices": cities, "answer": i}) + "\n"
                            for i, (country, _) in enumerate(CAPITALS)))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    return name


@contextlib.contextmanager
def scrambled(model):
    """A member context that breaks the model in place (and restores it): the bridge must see it."""
    layer = model.model.layers[0].mlp.down_proj
    saved = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.mul_(-40)
    try:
        yield
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def test_the_bridge_scores_a_local_task_on_the_model_in_process(tmp_path):
    from cl_runner.evaluation.harness import HarnessSuite
    from cl_runner.formatting import PromptFormatter
    from cl_runner.models import load_model

    model, tokenizer = load_model(compose_config([]).model)  # SmolLM2 knows these capitals
    formatter = PromptFormatter(tokenizer)
    suite = HarnessSuite(tasks=[local_task(tmp_path)], include_path=str(tmp_path), include_defaults=False)
    suite.setup(model, formatter, [contextlib.nullcontext], "cpu", 8)
    assert suite.score(model, formatter, [contextlib.nullcontext], "cpu", 8) == {"local_capitals/acc": 1.0}
    broken = suite.score(model, formatter, [lambda: scrambled(model)], "cpu", 8)["local_capitals/acc"]
    assert broken < 0.7  # the weights as they are in this process, not a copy loaded from disk


def test_harness_scores_go_to_the_chosen_rows_of_results(tmp_path):
    name = local_task(tmp_path)
    overrides = ["~eval.suites", "+eval.suites.harness._target_=cl_runner.evaluation.harness.HarnessSuite", f"+eval.suites.harness.tasks=[{name}]",
                 f"+eval.suites.harness.include_path={tmp_path}", "+eval.suites.harness.include_defaults=false", "+eval.suites.harness.rows=[0,-1]", "task_sequence.tasks=[second_word,third_word]"]
    results = run(compose_config([*SMOKE, *overrides]), tmp_path / "run")
    accuracy = results["abilities"]["harness"]["local_capitals/acc"]
    assert len(accuracy) == 3 and accuracy[1] is None  # base and after the last task only
    assert all(0.0 <= a <= 1.0 for a in (accuracy[0], accuracy[2]))
    assert results["abilities_delta"]["harness"]["local_capitals/acc"][2] == pytest.approx(accuracy[2] - accuracy[0])


def test_an_unknown_harness_task_is_one_clear_error(tmp_path):
    from cl_runner.evaluation.harness import HarnessSuite

    with pytest.raises(UserError, match="lm-eval knows no task no_such_task"):
        HarnessSuite(tasks=["no_such_task"], include_path=str(tmp_path), include_defaults=False).setup(None, None, [], "cpu", 8)
