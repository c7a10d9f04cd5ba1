"""General-ability suites (eval.suites): scored on every row, stored per row with their change from the base model."""

from __future__ import annotations

import json
import re

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

    def setup(self, model, formatter, members, device, batch_size):
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
    assert set(results["abilities"]) == {"scripted", "instruction_following", "instruction_drift", "knowledge_retention", "arithmetic", "commonsense", "code"}  # the defaults too
    assert len(results["abilities"]["instruction_following"]["prompt_level_strict_acc"]) == 5
    assert CALLS[0][0] == "setup" and [c[0] for c in CALLS[1:]] == ["score"] * 5
    assert all(not c[1] for c in CALLS if c[0] == "score")  # scored in eval mode (no dropout)
    events = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["abilities"]["scripted"]["score"] for e in events if e["event"] == "eval"] == SCRIPT
    assert (tmp_path / "abilities.png").stat().st_size > 0
    state = json.loads((tmp_path / "state.json").read_text())
    assert [row["scripted"]["score"] for row in state["abilities"]] == SCRIPT  # kept for a resume


def test_a_row_decodes_the_probe_and_every_suite_together(tmp_path, monkeypatch):
    """One shared decoding per row (and one at setup, which row 0 reuses); nothing is decoded per suite."""
    import transformers

    import cl_runner.evaluation.generation as generation

    batches = []
    decode = generation.greedy_cached
    monkeypatch.setattr(generation, "greedy_cached", lambda model, ids, mask, budgets, *rest: batches.append(list(budgets)) or decode(model, ids, mask, budgets, *rest))
    monkeypatch.setattr(transformers.GenerationMixin, "generate", lambda *a, **k: pytest.fail("a suite or the probe decoded on its own"))
    results = run(compose_config(SMOKE), tmp_path)
    assert len(results["abilities"]) == 6 and results["general"][0] is not None
    # setup: drift's 2 instructions and knowledge's 2 facts; each row: 6 probe prompts and every suite's prompts, longest budgets first
    assert len(batches) == 6 and sorted(batches[0], reverse=True) == batches[0] and len(batches[0]) == 4
    assert len(batches[1]) == 6 + 2 + 2 + 1  # row 0: probe, IF, arithmetic, code; drift's and the known facts' answers come from setup


def test_a_run_without_suites_has_empty_abilities(tmp_path):
    results = run(compose_config([*SMOKE, "~eval.suites"]), tmp_path)
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


def test_settings_for_a_suite_the_eval_config_lacks_are_refused(tmp_path):
    with pytest.raises(UserError, match="eval.suites.instruction_following has settings but no _target_"):
        run(compose_config([*SMOKE, "eval=tasks_only"]), tmp_path)  # smoke sizes a suite tasks_only does not have


def test_kl_along_the_responses_by_hand():
    import math

    import torch

    from cl_runner.evaluation.drift import _mean_kl

    base = [torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))]
    current = [torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))]
    by_hand = (0.0 + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2  # mean over the two tokens
    assert _mean_kl(base, current) == pytest.approx(by_hand)
    assert _mean_kl(base, base) == 0.0


def test_drift_is_zero_for_the_base_model_and_grows_with_training(tmp_path):
    cfg = compose_config([*SMOKE, "~eval.suites.instruction_following", "trainer.lr=0.05", "eval.suites.instruction_drift.max_new_tokens=8"])
    drift = run(cfg, tmp_path)["abilities"]["instruction_drift"]
    assert drift["kl"][0] == 0.0 and drift["rouge_l"][0] == 1.0  # row 0: the base model against itself
    assert all(k > 1e-4 for k in drift["kl"][1:])  # a trained adapter moves the distributions


def test_knowledge_retention_scores_only_what_the_base_model_knew(monkeypatch):
    from contextlib import nullcontext

    import cl_runner.evaluation.short_answer as short_answer
    from cl_runner.evaluation.short_answer import KnowledgeRetentionSuite
    from cl_runner.tasks import Example

    replies = iter([["It is Paris.", "No idea.", "Rome, of course."],  # setup: facts 1 and 3 are known
                    ["Paris", "Madrid"]])  # a later row, asked the known facts only: the first kept, the other lost
    monkeypatch.setattr(short_answer, "generate", lambda model, formatter, examples, *args, **kwargs: next(replies)[: len(examples)])
    suite = KnowledgeRetentionSuite()
    suite.examples = [Example("Capital of France?", "Paris"), Example("Capital of Peru?", "Lima"), Example("Capital of Italy?", "Rome")]
    suite.setup(None, None, [nullcontext], "cpu", 8)
    assert [e.target for e in suite.known] == ["Paris", "Rome"]
    assert suite.score(None, None, [nullcontext], "cpu", 8) == {"retained": 0.5, "known": 2.0}


def test_arithmetic_problems_have_the_answers_their_numbers_give():
    from cl_runner.evaluation.short_answer import last_integer, word_problems

    problems = word_problems(12, seed=3)
    assert problems == word_problems(12, seed=3) and problems != word_problems(12, seed=4)
    for problem in problems:
        a, b = (int(n) for n in re.findall(r"\d+", problem.prompt)[:2])
        wanted = a + b if "more" in problem.prompt else a - b if ("left" in problem.prompt or "takes away" in problem.prompt) else a * b
        assert problem.target == str(wanted), problem.prompt
        assert wanted >= 0  # the larger number comes first: no negative answers
    assert last_integer("So 3 + 4 = 7.") == "7" and last_integer("It is 3,400 apples") == "3400" and last_integer("none") is None


def test_commonsense_ranks_choices_by_the_model_log_likelihood(monkeypatch):
    from contextlib import nullcontext

    import cl_runner.evaluation.commonsense as commonsense
    from cl_runner.evaluation.commonsense import CommonsenseSuite

    suite = CommonsenseSuite(size=2)
    assert [e.target for e in suite.examples] == [suite.examples[0].choices[0], suite.examples[1].choices[1]]  # answers 0 and 1
    # Scripted log-likelihoods. Item 1: its answer ("put it in the freezer") wins raw and per character.
    # Item 2: its answer ("break", 5 characters) wins raw, -3 against -4 for "bounce back up" (14
    # characters), but loses per character: -0.6 against -0.29.
    scores = [[-1.0, -5.0, -5.0, -5.0], [-4.0, -3.0, -40.0, -40.0]]
    monkeypatch.setattr(commonsense, "choice_loglikelihoods", lambda *args, **kwargs: scores)

    class Formatter:
        tokenizer = type("T", (), {"pad_token_id": 0})()

        def encode_choices(self, example):
            return example

    assert suite.score(None, Formatter(), [nullcontext], "cpu", 8) == {"acc": 1.0, "acc_norm": 0.5}


def test_code_replies_run_against_their_tests_in_the_sandbox(monkeypatch):
    from contextlib import nullcontext

    import cl_runner.evaluation.code as code
    from cl_runner.evaluation.code import CodeSuite, extract_code

    replies = ["```python\ndef add(a, b):\n    return a + b\n```\nThis adds.",  # passes
               "def is_even(n):\n    return n % 2 == 1\n",  # wrong
               "```py\ndef reverse_string(s):\n    while True:\n        pass\n```",  # loops: stopped
               "import os\nos.system('true')\ndef largest(xs):\n    return max(xs)\n"]  # starts a process: refused
    monkeypatch.setattr(code, "generate", lambda *args, **kwargs: replies)
    suite = CodeSuite(size=4, timeout_s=1)
    scores = suite.score(None, None, [nullcontext], "cpu", 8)
    assert scores["pass@1"] == 0.25
    assert (scores["outcome/failed"], scores["outcome/cpu_limit"] + scores["outcome/timeout"], scores["outcome/refused"]) == (0.25, 0.25, 0.25)
    assert extract_code("Here:\n```python\nx = 1\n```") == "x = 1\n" and extract_code("x = 2") == "x = 2"
