"""Scoring generated text against a reference: exact match, containment, ROUGE-L."""

from __future__ import annotations

import string


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
