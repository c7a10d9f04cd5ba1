"""Commonsense multiple choice, ranked by log-likelihood (``acc`` and ``acc_norm``, as lm-evaluation-harness
scores ARC, PIQA or HellaSwag).

Twenty built-in, hand-written everyday questions with four choices each (the answer's position
varies); ``data=`` takes a JSONL file of ``{"question", "choices", "answer": index}``. Each
choice is scored as the model's answer to the question (chat template on, as the sequence's
own multiple-choice tasks are scored: ``cl_runner/evaluation/loglikelihood.py``); with several
members, their log-likelihoods are averaged.
"""

from __future__ import annotations

from cl_runner.evaluation.loglikelihood import choice_loglikelihoods, choice_metrics
from cl_runner.evaluation.suites import suite_records
from cl_runner.tasks import Example


class CommonsenseSuite:
    headline = "acc_norm"

    def __init__(self, data: str = "builtin", size: int | None = None):
        def example(record: dict) -> Example:
            choices = tuple(str(c) for c in record["choices"])
            return Example(str(record["question"]), choices[int(record["answer"])], choices)

        self.examples = suite_records("commonsense", data, "commonsense.jsonl", example, size)

    def setup(self, model, formatter, members, device, batch_size: int) -> None:
        """Nothing to record on the base model."""

    def score(self, model, formatter, members, device, batch_size: int) -> dict[str, float]:
        requests = [formatter.encode_choices(e) for e in self.examples]
        per_member = []
        for member in members:
            with member():
                per_member.append(choice_loglikelihoods(model, requests, formatter.tokenizer.pad_token_id, batch_size, device))
        averaged = [[sum(values) / len(values) for values in zip(*item)] for item in zip(*per_member)]
        return choice_metrics([e.choices for e in self.examples], [e.target for e in self.examples], averaged)
