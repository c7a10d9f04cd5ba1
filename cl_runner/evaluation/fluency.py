"""Fluency: ROME's generation entropy, the weighted bigram/trigram entropy of greedy continuations.

As ROME computes it, over the words (and punctuation marks) of prompt + continuation, case
kept; unlike ROME, which samples top-5 continuations of at most 100 tokens in all, the
continuations are greedy (as EasyEdit's) and ``max_new_tokens`` long, so the figures compare
with each other (rows, methods), not with published ones. With several members (an ensemble)
the figure is the mean of each member's.

Repetitive text ("Paris Paris Paris ...") has low n-gram entropy: an edit that breaks the model's
language shows up here before it shows up in any accuracy. Measured on every row of the matrix
for sequences that set ``fluency`` (prompts from their edit requests' ``generation_prompts``),
so the change from the base model to the last row sits next to the general probe's.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

from cl_runner.evaluation.generation import generate
from cl_runner.errors import UserError
from cl_runner.tasks import Example


def ngram_entropy(text: str, n: int) -> float:
    """Entropy (bits) of the frequency distribution of the text's word n-grams."""
    words = re.findall(r"\w+|[^\w\s]", text)
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def fluency(texts: Sequence[str]) -> float | None:
    """ROME's generation entropy: the mean over texts of (2/3 H2 + 4/3 H3) / 2."""
    if not texts:
        return None
    return sum((2 / 3 * ngram_entropy(t, 2) + 4 / 3 * ngram_entropy(t, 3)) / 2 for t in texts) / len(texts)


def generation_fluency(model, raw_formatter, prompts: Sequence[str], max_new_tokens: int, batch_size: int, device, members) -> float | None:
    """:func:`fluency` of prompt + greedy continuation (as ROME scores it), averaged over the
    members that answer together (one for most methods)."""
    examples = [Example(p, "") for p in prompts]
    per_member = []
    was_training = model.training
    model.eval()  # no dropout: a row after a trained task must generate as row 0 does
    try:
        for member in members:
            with member():
                continuations = generate(model, raw_formatter, examples, max_new_tokens, batch_size, device)
            per_member.append(fluency([f"{p} {c}" for p, c in zip(prompts, continuations)]))
    finally:
        model.train(was_training)
    return sum(per_member) / len(per_member) if per_member else None


def fluency_prompts(tasks, count: int) -> list[str]:
    """``count`` generation prompts spread evenly over the edit tasks' requests (each request's first)."""
    available = [r.generation_prompts[0] for t in tasks if t.type == "edit" for r in t.requests if r.generation_prompts]
    if count <= 0 or not available:
        return []
    count = min(count, len(available))
    return [available[i * len(available) // count] for i in range(count)]


def fluency_settings(sequence: dict, tasks) -> tuple[list[str], int]:
    """The prompts and continuation length ``task_sequence.fluency: {prompts, max_new_tokens}`` asks for ([] when unset)."""
    settings = sequence.get("fluency") or {}
    wanted = f"task_sequence.fluency must be {{prompts: N >= 0, max_new_tokens: M >= 1}}, got {settings!r}"
    if not isinstance(settings, Mapping) or set(settings) - {"prompts", "max_new_tokens"}:
        raise UserError(wanted)
    count, tokens = settings.get("prompts", 0), settings.get("max_new_tokens", 96)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (count, tokens)) or count < 0 or tokens < 1:
        raise UserError(wanted)
    prompts = fluency_prompts(tasks, count)
    if count and not prompts:
        raise UserError("task_sequence.fluency: no edit task in this sequence has generation_prompts to measure fluency on")
    return prompts, tokens
