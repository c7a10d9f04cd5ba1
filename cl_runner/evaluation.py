"""Scoring a model on a task: log-likelihood ranking of choices, or greedy generation.

``acc`` ranks each example's choices by the summed log-probability of their tokens after the
prompt (lm-evaluation-harness' multiple-choice accuracy). When every choice of an example is
a single token, that log-probability is read off one forward pass of the prompt alone: the
same number, at 1/len(choices) of the cost. Generation metrics (``exact_match``,
``contains``, ``rouge_l``) decode greedily.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from cl_runner.formatting import PromptFormatter
from cl_runner.tasks import Example, Task
from cl_runner.training import pad_right


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace (SQuAD-style normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def contains(prediction: str, target: str) -> float:
    """1 if the normalised target occurs in the normalised prediction as whole words."""
    pred, tgt = f" {normalize_answer(prediction)} ", f" {normalize_answer(target)} "
    return float(tgt.strip() != "" and tgt in pred)


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1 over whitespace tokens of the normalised strings."""
    a, b = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


GENERATION_METRICS = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l}


def _right_padded(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_right(sequences, pad_id)
    return ids.to(device), mask.to(device)


def _batched_by_length(items: list, length, batch_size: int):
    order = sorted(range(len(items)), key=lambda i: length(items[i]))
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start : start + batch_size]]


@torch.no_grad()
def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, device) -> list[float]:
    """Summed log-probability of each continuation given its context (one sequence per request)."""
    scores = [0.0] * len(requests)
    indexed = list(enumerate(requests))
    for batch in _batched_by_length(indexed, lambda r: len(r[1][0]) + len(r[1][1]), batch_size):
        sequences = [ctx + cont for _, (ctx, cont) in batch]
        ids, mask = _right_padded(sequences, pad_id, device)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (index, (ctx, cont)) in enumerate(batch):
            positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=logprobs.device)
            scores[index] = float(logprobs[row, positions, torch.tensor(cont, device=logprobs.device)].sum())
    return scores


@torch.no_grad()
def next_token_logprobs(model, contexts: list[list[int]], pad_id: int, batch_size: int, device) -> list[torch.Tensor]:
    """Log-probabilities of the next token after each context (one forward pass per context)."""
    results: list[torch.Tensor] = [None] * len(contexts)  # type: ignore[list-item]
    for batch in _batched_by_length(list(enumerate(contexts)), lambda r: len(r[1]), batch_size):
        ids, mask = _right_padded([ctx for _, ctx in batch], pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        last = mask.sum(dim=1) - 1
        logprobs = torch.log_softmax(logits[torch.arange(len(batch)), last].float(), dim=-1).cpu()
        for row, (index, _) in enumerate(batch):
            results[index] = logprobs[row]
    return results


def choice_accuracy(model, formatter: PromptFormatter, examples: Sequence[Example], batch_size: int, device) -> float:
    pad_id = formatter.tokenizer.pad_token_id
    contexts = [formatter.prompt_ids(e.prompt) for e in examples]
    choice_ids = [[formatter.continuation_ids(c) for c in e.choices] for e in examples]
    single = [i for i, ids in enumerate(choice_ids) if all(len(c) == 1 for c in ids) and len({c[0] for c in ids}) == len(ids)]
    multi = sorted(set(range(len(examples))) - set(single))
    scores: dict[int, list[float]] = {}
    for i, logprobs in zip(single, next_token_logprobs(model, [contexts[i] for i in single], pad_id, batch_size, device)):
        scores[i] = [float(logprobs[c[0]]) for c in choice_ids[i]]
    requests = [(contexts[i], c) for i in multi for c in choice_ids[i]]
    flat = iter(continuation_logprobs(model, requests, pad_id, batch_size, device))
    for i in multi:
        scores[i] = [next(flat) for _ in choice_ids[i]]
    correct = sum(examples[i].choices[max(range(len(s)), key=s.__getitem__)] == examples[i].target for i, s in scores.items())
    return correct / len(examples)


@torch.no_grad()
def generate(model, formatter: PromptFormatter, prompts: Sequence[str], max_new_tokens: int, batch_size: int, device) -> list[str]:
    """Greedy completions, batched with left padding as decoder-only generation requires."""
    tokenizer = formatter.tokenizer
    outputs = [""] * len(prompts)
    indexed = [(i, formatter.prompt_ids(p)) for i, p in enumerate(prompts)]
    for batch in _batched_by_length(indexed, lambda r: len(r[1]), batch_size):
        width = max(len(ids) for _, ids in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, seq) in enumerate(batch):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        generated = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True,
        )
        for row, (index, _) in enumerate(batch):
            outputs[index] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    return outputs


def evaluate_task(model, formatter: PromptFormatter, task: Task, batch_size: int, device) -> float:
    """The task's metric on its test split, in [0, 1]."""
    was_training = model.training
    model.eval()
    try:
        if task.metric == "acc":
            return choice_accuracy(model, formatter, task.test, batch_size, device)
        max_new = int(task.generation_kwargs.get("max_new_tokens", 16))
        predictions = generate(model, formatter, [e.prompt for e in task.test], max_new, batch_size, device)
        metric = GENERATION_METRICS[task.metric]
        return sum(metric(p, e.target) for p, e in zip(predictions, task.test)) / len(task.test)
    finally:
        model.train(was_training)


def evaluate_tasks(model, formatter, tasks: Sequence[Task], batch_size: int, device, eval_context, desc: str, progress_bar: bool = True) -> list[float]:
    """Score every task, each under ``eval_context(task_index)`` (the method picks its weights)."""
    scores = []
    for index, task in enumerate(tqdm(tasks, desc=desc, leave=False, disable=not progress_bar)):
        with eval_context(index):
            scores.append(evaluate_task(model, formatter, task, batch_size, device))
    return scores
