"""Scoring a model on a task, one module per kind of scoring.

- ``loglikelihood``: multiple choice, ranked by log-likelihood (``acc``, ``acc_norm``);
- ``generation`` + ``text_metrics``: greedy generation scored by ``exact_match``, ``contains``
  or ``rouge_l``.

``evaluate_task`` returns every score the task's kind yields; the task's ``metric`` names the
one that goes into the accuracy matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm.auto import tqdm

from cl_runner.evaluation.generation import generate
from cl_runner.evaluation.loglikelihood import choice_loglikelihoods, choice_metrics
from cl_runner.evaluation.text_metrics import GENERATION_METRICS
from cl_runner.formatting import PromptFormatter
from cl_runner.tasks import Task

CHOICE_METRICS = ("acc", "acc_norm")


def evaluate_task(model, formatter: PromptFormatter, task: Task, batch_size: int, device) -> dict[str, float]:
    """The task's scores on its test split, each in [0, 1]: ``{"acc": .., "acc_norm": ..}`` or ``{metric: ..}``."""
    was_training = model.training
    model.eval()
    try:
        if task.metric in CHOICE_METRICS:
            requests = [formatter.encode_choices(e) for e in task.test]
            scores = choice_loglikelihoods(model, requests, formatter.tokenizer.pad_token_id, batch_size, device)
            return choice_metrics([e.choices for e in task.test], [e.target for e in task.test], scores)
        kwargs = task.generation_kwargs
        predictions = generate(model, formatter, task.test, task.answer_reserve, batch_size, device, until=kwargs.get("until", ()))
        metric = GENERATION_METRICS[task.metric]
        return {task.metric: sum(metric(p, e.target) for p, e in zip(predictions, task.test)) / len(task.test)}
    finally:
        model.train(was_training)


def evaluate_tasks(model, formatter, tasks: Sequence[Task], batch_size: int, device, eval_context, desc: str, progress_bar: bool = True) -> list[dict[str, float]]:
    """Score every task, each under ``eval_context(task_index)`` (the method picks its weights)."""
    scores = []
    for index, task in enumerate(tqdm(tasks, desc=desc, leave=False, disable=not progress_bar)):
        with eval_context(index):
            scores.append(evaluate_task(model, formatter, task, batch_size, device))
    return scores
