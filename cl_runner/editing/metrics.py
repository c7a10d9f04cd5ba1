"""Edit metrics, both families users compare against.

CounterFact (ROME / MEMIT papers), from the mean per-token NLL of " target_new" and
" target_true" after a prompt:
- efficacy (ES): the rewrite prompt prefers the new target (NLL_new < NLL_true);
- paraphrase (PS, generalisation): the same on the paraphrases;
- neighbourhood (NS, specificity): prompts about other subjects with the same relation still
  prefer the true target;
- magnitudes: p_new - p_true (ES, PS) and p_true - p_new (NS), p = exp(-NLL);
- score: the harmonic mean of ES, PS and NS;
- fluency: the weighted bigram/trigram entropy of greedy generations, (2/3 H2 + 4/3 H3) / 2, log2.

EasyEdit (teacher forced, token level): rewrite accuracy and rephrase accuracy, the share of
target_new's tokens that are the argmax after the prompt's text and the target's earlier
tokens; locality, the share of a neighbourhood answer's argmax tokens the edit left unchanged.

Each score is a pure function of numbers computed by the model-facing helpers below.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

from cl_runner.editing.activations import right_padded, target_ids


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
            log_probs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            for row, (prompt, target) in enumerate(encoded):
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target), device=device)
                picked = log_probs[row, positions]
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


def ngram_entropy(text: str, n: int) -> float:
    """Entropy (bits) of the frequency distribution of the text's word n-grams."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0


def fluency(texts: Sequence[str]) -> float | None:
    """ROME's generation entropy: the mean over texts of (2/3 H2 + 4/3 H3) / 2."""
    if not texts:
        return None
    return sum((2 / 3 * ngram_entropy(t, 2) + 4 / 3 * ngram_entropy(t, 3)) / 2 for t in texts) / len(texts)
