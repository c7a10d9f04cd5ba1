"""Scoring a model on a task, one module per kind of scoring.

- ``loglikelihood``: multiple choice, ranked by log-likelihood (``acc``, ``acc_norm``);
- ``generation`` + ``text_metrics``: greedy generation scored by ``exact_match``, ``contains``
  or ``rouge_l``;
- ``perplexity``: held-out documents of text tasks (``perplexity``, ``log_perplexity``).

``evaluate_task`` returns every score the task's kind yields; the task's ``metric`` names the
one that goes into the accuracy matrix.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext

from tqdm.auto import tqdm

from cl_runner.evaluation.generation import generate
from cl_runner.evaluation.loglikelihood import choice_loglikelihoods, choice_metrics
from cl_runner.evaluation.perplexity import perplexity_scores
from cl_runner.evaluation.text_metrics import GENERATION_METRICS
from cl_runner.formatting import PromptFormatter
from cl_runner.tasks import Task
from cl_runner.training.batching import padded_batches

CHOICE_METRICS = ("acc", "acc_norm")

# A member of an ensemble: entering the context makes the model compute that member's answers.
Member = Callable[[], AbstractContextManager]


def evaluate_task(model, formatter: PromptFormatter, task: Task, batch_size: int, device, members: Sequence[Member] = (nullcontext,),
                  router: Callable[[Callable[[], Iterator[dict]]], list[int] | None] | None = None,
                  generation_batch_size: int | None = None) -> dict[str, float]:
    """The task's scores on its test split: ``{"acc": .., "acc_norm": ..}`` or ``{metric: ..}`` in [0, 1]; a text task's perplexities.

    ``batch_size`` items are scored per forward pass, ``generation_batch_size`` (default: the
    same) prompts decoded together.

    With several ``members`` (one model each), their choice log-likelihoods are averaged, and
    their generated answers put to a majority vote (a tie goes to the earliest member). A
    ``router`` (given the test prompts as padded batches) may instead send each example to one
    member (``routes[i]``), which alone answers it.
    """
    if task.type == "edit":  # knowledge edits: CounterFact's and EasyEdit's scores (cl_runner/editing/metrics.py)
        from cl_runner.editing.metrics import edit_task_scores

        return edit_task_scores(model, formatter.tokenizer, task.requests, members, batch_size, task.locality_reference)
    was_training = model.training
    model.eval()
    try:
        if task.type == "text":
            return perplexity_scores(model, formatter, task, batch_size, device, members, router, _answers)
        routes = None
        if router is not None:
            prompts = [formatter.encode_prompt(e, task.answer_reserve) for e in task.test]
            routes = router(lambda: padded_batches(prompts, batch_size, device))
        chosen = [list(range(len(task.test))) if routes is None else [i for i, r in enumerate(routes) if r == m] for m in range(len(members))]
        if task.metric in CHOICE_METRICS:
            requests = [formatter.encode_choices(e) for e in task.test]
            per_member = [_answers(member, chosen[m], lambda items: choice_loglikelihoods(model, [requests[i] for i in items], formatter.tokenizer.pad_token_id, batch_size, device))
                          for m, member in enumerate(members)]
            scores = [mean_scores([[answers[i]] for answers in per_member if i in answers])[0] for i in range(len(task.test))]
            return choice_metrics([e.choices for e in task.test], [e.target for e in task.test], scores)
        kwargs = task.generation_kwargs
        decode_batch = generation_batch_size or batch_size
        per_member = [_answers(member, chosen[m], lambda items: generate(model, formatter, [task.test[i] for i in items], task.answer_reserve, decode_batch, device, until=kwargs.get("until", ())))
                      for m, member in enumerate(members)]
        predictions = [majority_vote([answers[i] for answers in per_member if i in answers]) for i in range(len(task.test))]
        metric = GENERATION_METRICS[task.metric]
        return {task.metric: sum(metric(p, e.target, e.prompt) for p, e in zip(predictions, task.test)) / len(task.test)}
    finally:
        model.train(was_training)


def _answers(member: Member, items: list[int], answer) -> dict[int, object]:
    """``{item: answer}`` for the items this member answers, computed under its context."""
    if not items:
        return {}
    with member():
        return dict(zip(items, answer(items)))


def mean_scores(per_member: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """``scores[item][choice]`` averaged over members."""
    return [[sum(values) / len(values) for values in zip(*item)] for item in zip(*per_member)]


def majority_vote(answers: Sequence[str]) -> str:
    counts = Counter(answers)
    return max(answers, key=lambda a: counts[a])  # max keeps the first of equals: the earliest member wins a tie


def evaluate_tasks(model, formatter, tasks: Sequence[Task], batch_size: int, device, members_of: Callable[[int], Sequence[Member]],
                   desc: str, progress_bar: bool = True, router_of: Callable[[int], object] | None = None,
                   generation_batch_size: int | None = None) -> list[dict[str, float]]:
    """Score every task, task i with the models ``members_of(i)`` names (the method picks its weights), routed by ``router_of(i)``."""
    return [
        evaluate_task(model, formatter, task, batch_size, device, members_of(index), router_of(index) if router_of else None, generation_batch_size)
        for index, task in enumerate(tqdm(tasks, desc=desc, leave=False, disable=not progress_bar))
    ]
