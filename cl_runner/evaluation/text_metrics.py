"""Scoring generated text against a reference: exact match, containment, ROUGE-L, edit similarity, SARI.

Each metric is ``metric(prediction, target, source)``; only SARI reads ``source`` (the input text).
"""

from __future__ import annotations

import re
import string
from collections import Counter


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace (SQuAD-style normalisation)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def exact_match(prediction: str, target: str, source: str = "") -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def contains(prediction: str, target: str, source: str = "") -> float:
    """1 if the normalised target occurs in the normalised prediction as whole words."""
    pred, tgt = f" {normalize_answer(prediction)} ", f" {normalize_answer(target)} "
    return float(tgt.strip() != "" and tgt in pred)


def longest_common_subsequence(a, b) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, target: str, source: str = "") -> float:
    """ROUGE-L F1 over whitespace tokens of the normalised strings."""
    a, b = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not a or not b:
        return float(a == b)
    lcs = longest_common_subsequence(a, b)
    return _f1(lcs / len(a), lcs / len(b))


def edit_similarity(prediction: str, target: str, source: str = "") -> float:
    """Character-level similarity 1 - indel distance / (len a + len b) = 2 LCS / (len a + len b): the
    Levenshtein ratio fuzzywuzzy's ``fuzz.ratio`` gives (/100), which TRACE scores Py150's code with."""
    a, b = prediction.strip(), target.strip()
    if not a and not b:
        return 1.0
    return 2 * longest_common_subsequence(a, b) / (len(a) + len(b))


def _sari_tokens(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())  # words and punctuation apart, as sacrebleu's 13a tokenizer


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _sari_ngram(source: Counter, prediction: Counter, references: list[Counter]) -> tuple[float, float, float]:
    """SARI's keep F1, deletion precision and addition F1 for one n-gram order (Xu et al., 2016)."""
    count = len(references)
    reference = sum(references, Counter())
    source_rep = Counter({g: c * count for g, c in source.items()})
    prediction_rep = Counter({g: c * count for g, c in prediction.items()})
    kept = source_rep & prediction_rep
    kept_good, kept_all = kept & reference, source_rep & reference
    keep_precision = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_recall = sum(kept_good.values()) / sum(kept_all.values()) if kept_all else 1.0
    deleted = source_rep - prediction_rep
    deleted_good = deleted - reference
    delete_precision = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0
    added = set(prediction) - set(source)
    added_good, added_all = added & set(reference), set(reference) - set(source)
    add_precision = len(added_good) / len(added) if added else 1.0
    add_recall = len(added_good) / len(added_all) if added_all else 1.0
    return _f1(keep_precision, keep_recall), delete_precision, _f1(add_precision, add_recall)


def sari(prediction: str, target: str | list[str], source: str = "") -> float:
    """SARI (Xu et al., 2016) of a rewrite of ``source`` against one or more references, in [0, 1]:
    the mean over n = 1..4 of keep F1, deletion precision and addition F1, averaged (as EASSE and
    Hugging Face's ``sari`` compute it, /100). TRACE scores 20Minuten's simplifications with it."""
    references = [target] if isinstance(target, str) else list(target)
    tokens = [_sari_tokens(source), _sari_tokens(prediction), [_sari_tokens(r) for r in references]]
    scores = [_sari_ngram(_ngrams(tokens[0], n), _ngrams(tokens[1], n), [_ngrams(r, n) for r in tokens[2]]) for n in range(1, 5)]
    keep, delete, add = (sum(s[k] for s in scores) / 4 for k in range(3))
    return (keep + delete + add) / 3


GENERATION_METRICS = {"exact_match": exact_match, "contains": contains, "rouge_l": rouge_l, "edit_similarity": edit_similarity, "sari": sari}
