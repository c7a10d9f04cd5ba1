"""Multiple-choice scoring by log-likelihood: ``acc`` and ``acc_norm``, as lm-evaluation-harness defines them.

Each choice is scored on exactly the tokens training teaches for it (the in-context answer
with its end-of-turn marker, ``PromptFormatter.encode_choices``), so a choice that is a token
prefix of another ("North" / "North America") is told apart by whether the turn ends there.

Speed comes from computing less, not from approximating (cl_runner/layout.py): a batch of
items goes into prefix-tree rows, so each item's prompt is computed once for all its choices
and the prefix that the items share (chat template, system prompt, instruction) once for the
whole row; the vocabulary projection runs only at the positions that predict a choice token.
PEFT prompt, P- and prefix tuning run their virtual tokens once as a KV cache that the tree's
rows continue. Models that cannot take a prefix-tree layout (attention kernels without custom
masks, other virtual-token methods) are scored one padded sequence per choice, still
projecting only where read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_runner.formatting import ChoiceRequest
from cl_runner.forward import forward_selected
from cl_runner.layout import Layout, build_layout


def _layout(model, requests: Sequence[ChoiceRequest], pad_id: int, row_tokens: int, layout: str) -> Layout:
    sequences = [r.prompt + c for r in requests for c in r.choices]
    targets = [range(len(r.prompt), len(r.prompt) + len(c)) for r in requests for c in r.choices]
    capacity = max(row_tokens, max(len(s) for s in sequences))  # a long item still shares its prompt across its choices
    return build_layout(model, layout, sequences, targets, pad_id, capacity)


@torch.no_grad()
def choice_loglikelihoods(model, requests: Sequence[ChoiceRequest], pad_id: int, batch_size: int, device,
                          row_tokens: int = 1024, layout: str = "auto") -> list[list[float]]:
    """Summed log-probability of each choice's tokens after its prompt: ``scores[item][choice]``.

    ``batch_size`` items go into one forward pass. ``layout="auto"`` picks, per batch, the
    cheapest layout the model supports (one padded row per choice, a shared prefix, or a prefix
    tree: ``cheapest_layout``); another name of ``layout.LAYOUTS`` asks for that one (tests
    compare them).
    """
    # Items of similar length share a forward pass: less padding between rows. Longest first, like lm-eval.
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i].prompt) + sum(map(len, requests[i].choices))))
    scores: list[list[float]] = [[] for _ in requests]
    for start in range(0, len(order), batch_size):
        batch = [requests[i] for i in order[start : start + batch_size]]
        laid = _layout(model, batch, pad_id, row_tokens, layout).to(device)
        logits = forward_selected(model, laid.input_ids, laid.read_rows, laid.read_cols, **laid.model_inputs).logits
        token_logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, laid.targets[:, None])[:, 0]
        sums = torch.zeros(int(laid.owners.max()) + 1, dtype=torch.float64, device=token_logprobs.device)
        sums = sums.index_add_(0, laid.owners, token_logprobs.double()).cpu().tolist()
        sequence = 0
        for i in order[start : start + batch_size]:
            scores[i] = sums[sequence : sequence + len(requests[i].choices)]
            sequence += len(requests[i].choices)
    return scores


def _first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first of ties, like numpy.argmax


def choice_metrics(choices: Sequence[Sequence[str]], targets: Sequence[str], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """``acc``: the highest log-likelihood is the target; ``acc_norm``: the same after dividing by the choice's length in characters."""
    acc = acc_norm = 0
    for options, target, loglik in zip(choices, targets, scores):
        acc += options[_first_argmax(loglik)] == target
        acc_norm += options[_first_argmax([s / max(len(o), 1) for s, o in zip(loglik, options)])] == target
    return {"acc": acc / len(targets), "acc_norm": acc_norm / len(targets)}
