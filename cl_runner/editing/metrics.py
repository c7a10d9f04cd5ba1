"""Edit metrics, both families users compare against.

CounterFact (ROME / MEMIT papers), from the mean per-token NLL of " target_new" and
" target_true" after a prompt:
- efficacy (ES): the rewrite prompt prefers the new target (NLL_new < NLL_true);
- paraphrase (PS, generalisation): the same on the paraphrases;
- neighbourhood (NS, specificity): prompts about other subjects with the same relation still
  prefer the true target;
- magnitudes: p_new - p_true (ES, PS) and p_true - p_new (NS), p = exp(-NLL);
- score: the harmonic mean of ES, PS and NS;
- (fluency, ROME's generation entropy, is a row-level measure: cl_runner/evaluation/fluency.py.)

EasyEdit (teacher forced, token level): rewrite accuracy and rephrase accuracy, the share of
target_new's tokens that are the argmax after the prompt's text and the target's earlier
tokens; locality, the share of the argmax tokens over each neighbourhood prompt's kept answer
that equal the unedited model's (:func:`locality_reference`, computed once before the first edit).

Each score is a pure function of numbers computed by the model-facing helpers below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cl_runner.editing.activations import right_padded, target_ids
from cl_runner.forward import forward_selected


@torch.no_grad()
def teacher_forced(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 16) -> list[tuple[float, list[int]]]:
    """For each (prompt, target): the target's mean per-token NLL and the argmax token at each of its positions."""
    device = next(model.parameters()).device
    results = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = [(tokenizer(p)["input_ids"], target_ids(tokenizer, t)) for p, t in zip(prompts[start : start + batch_size], targets[start : start + batch_size])]
            ids, mask = right_padded([p + t for p, t in encoded], tokenizer.pad_token_id, device)
            # Target token i is predicted at position len(prompt) - 1 + i; only those positions reach the vocabulary projection.
            rows = torch.tensor([row for row, (_, target) in enumerate(encoded) for _ in target], device=device)
            cols = torch.tensor([len(prompt) - 1 + i for prompt, target in encoded for i in range(len(target))], device=device)
            log_probs = forward_selected(model, ids, rows, cols, attention_mask=mask).logits.float().log_softmax(-1)
            start_at = 0
            for prompt, target in encoded:
                picked = log_probs[start_at : start_at + len(target)]
                start_at += len(target)
                nll = -picked[torch.arange(len(target), device=device), torch.tensor(target, device=device)].mean().item()
                results.append((nll, picked.argmax(-1).tolist()))
    finally:
        model.train(was_training)
    return results


def prefers(nll_first: float, nll_second: float) -> float:
    return float(nll_first < nll_second)


def harmonic_mean(values: Sequence[float]) -> float:
    return 0.0 if any(v <= 0 for v in values) else len(values) / sum(1 / v for v in values)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def token_accuracy(predicted: Sequence[int], wanted: Sequence[int]) -> float:
    return sum(p == w for p, w in zip(predicted, wanted)) / len(wanted)


def _neighbourhood_pairs(requests) -> list[tuple[int, str, str]]:
    return [(index, prompt, kept) for index, request in enumerate(requests) for prompt, kept in request.neighborhood if kept is not None]


def locality_reference(model, tokenizer, requests, batch_size: int = 16) -> list[list[list[int]]]:
    """Per request, per neighbourhood prompt: the argmax tokens over the answer it keeps, teacher
    forced (EasyEdit's pre-edit locality output). Computed on the unedited model."""
    pairs = _neighbourhood_pairs(requests)
    scored = teacher_forced(model, tokenizer, [p for _, p, _ in pairs], [k for _, _, k in pairs], batch_size) if pairs else []
    reference: list[list[list[int]]] = [[] for _ in requests]
    for (index, _, _), (_, argmax) in zip(pairs, scored):
        reference[index].append(argmax)
    return reference


def counterfact_scores(model, tokenizer, requests, batch_size: int = 16, reference: Sequence[Sequence[Sequence[int]]] | None = None) -> list[dict[str, float | None]]:
    """Per request: efficacy, paraphrase and neighbourhood success and magnitude, the EasyEdit
    token accuracies of target_new on the rewrite prompt and the paraphrases, and (given the
    unedited model's :func:`locality_reference`) EasyEdit's locality."""
    prompts, targets, owners = [], [], []
    for index, request in enumerate(requests):
        # (prompt, the answer it should keep): the neighbours keep their own (CounterFact: target_true)
        kinds = (("rewrite", [(request.rewrite_prompt, request.target_true)]), ("paraphrase", [(p, request.target_true) for p in request.paraphrase_prompts]),
                 ("neighborhood", list(request.neighborhood)))
        for kind, pairs in kinds:
            for prompt, kept in pairs:
                for which, target in (("new", request.target_new), ("true", kept)):
                    if target is None:
                        continue
                    prompts.append(prompt)
                    targets.append(target)
                    owners.append((index, kind, which))
    scored = teacher_forced(model, tokenizer, prompts, targets, batch_size) if prompts else []
    per_request: list[dict[str, list]] = [{} for _ in requests]
    for (index, kind, which), (nll, argmax), target in zip(owners, scored, targets):
        per_request[index].setdefault(f"{kind}_{which}", []).append((nll, argmax, target_ids(tokenizer, target)))
    scores = [_request_scores(parts) for parts in per_request]
    for index, request_scores in enumerate(scores):
        # the neighbours' kept answers were scored in _neighbourhood_pairs' order
        kept = [argmax for _, argmax, _ in per_request[index].get("neighborhood_true", [])]
        before = reference[index] if reference is not None else []
        if kept and before and len(kept) != len(before):
            raise ValueError(f"locality reference of request {index} has {len(before)} neighbours, the request {len(kept)}")
        request_scores["locality"] = mean([token_accuracy(now, then) for now, then in zip(kept, before)]) if kept and before else None
    return scores


def _request_scores(parts: dict[str, list]) -> dict[str, float | None]:
    scores: dict[str, float | None] = {}
    for kind, name in (("rewrite", "efficacy"), ("paraphrase", "paraphrase"), ("neighborhood", "neighborhood")):
        new, true = parts.get(f"{kind}_new", []), parts.get(f"{kind}_true", [])
        if not new or not true:  # no true target, or no prompts of this kind
            scores[name] = scores[f"{name}_magnitude"] = None
            continue
        keep_true = kind == "neighborhood"
        pairs = list(zip((n for n, _, _ in new), (t for t, _, _ in true)))
        scores[name] = mean([prefers(t, n) if keep_true else prefers(n, t) for n, t in pairs])
        gaps = [math.exp(-t) - math.exp(-n) for n, t in pairs]
        scores[f"{name}_magnitude"] = mean([g if keep_true else -g for g in gaps])
    for kind, name in (("rewrite", "rewrite_acc"), ("paraphrase", "rephrase_acc")):
        new = parts.get(f"{kind}_new", [])
        scores[name] = mean([token_accuracy(argmax, wanted) for _, argmax, wanted in new]) if new else None
    return scores


def aggregate(per_request: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Means over requests (each metric over the requests that have it) and CounterFact's score."""
    keys = per_request[0].keys() if per_request else ()
    totals = {k: mean([r[k] for r in per_request if r[k] is not None]) for k in keys}
    parts = [totals.get(k) for k in ("efficacy", "paraphrase", "neighborhood")]
    totals["score"] = harmonic_mean(parts) if all(p is not None for p in parts) else None
    return totals


def edit_task_scores(model, tokenizer, requests, members, batch_size: int = 16, reference=None) -> dict[str, float]:
    """An edit task's scores on one row of the matrix: :func:`aggregate` over its requests
    (CounterFact's score as ``edit_score``), under each member's weights, averaged over members."""
    per_member = []
    for member in members:
        with member():
            per_member.append(aggregate(counterfact_scores(model, tokenizer, requests, batch_size, reference)))
    scores = {}
    for key in per_member[0]:
        values = [m[key] for m in per_member if m[key] is not None]
        if values:
            scores["edit_score" if key == "score" else key] = sum(values) / len(values)
    return scores
