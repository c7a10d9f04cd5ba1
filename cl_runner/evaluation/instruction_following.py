"""Instruction following verified by code, as IFEval (Zhou et al., 2023) scores it.

Each prompt carries one or more verifiable instructions (``instruction_id_list``, with their
``kwargs``), named as IFEval names them. A response is checked against each:

- strict: the response as generated;
- loose: the instruction counts as followed if any of eight variants of the response follows
  it: the response, without its first line, without its last line, without both, and each
  of those with every ``*`` removed (markdown emphasis around an otherwise good answer).

Scores, with lm-evaluation-harness's names: ``prompt_level_strict_acc`` (every instruction of
a prompt followed), ``inst_level_strict_acc`` (each instruction on its own), and the same two
``loose``; and each kind's instruction-level accuracy.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from cl_runner.evaluation.generation import generate
from cl_runner.evaluation.suites import suite_records
from cl_runner.tasks import Example

Check = Callable[..., bool]


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


def _compare(count: int, relation: str, number: int) -> bool:
    if relation == "at least":
        return count >= number
    if relation == "less than":
        return count < number
    raise ValueError(f"relation must be 'at least' or 'less than', got {relation!r}")


def all_capitals(text: str) -> bool:
    return text.isupper()


def all_lowercase(text: str) -> bool:
    return text.islower()


def number_words(text: str, num_words: int, relation: str) -> bool:
    return _compare(_words(text), relation, num_words)


def number_bullet_lists(text: str, num_bullets: int) -> bool:
    """Exactly ``num_bullets`` markdown bullets (``* item`` or ``- item``)."""
    stars = re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)
    return len(stars) + len(dashes) == num_bullets


def keyword_existence(text: str, keywords: Sequence[str]) -> bool:
    return all(re.search(re.escape(k), text, flags=re.IGNORECASE) for k in keywords)


def forbidden_words(text: str, forbidden_words: Sequence[str]) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", text, flags=re.IGNORECASE) for w in forbidden_words)


def keyword_frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(re.findall(re.escape(keyword), text, flags=re.IGNORECASE)), relation, frequency)


def json_format(text: str) -> bool:
    """The whole response is JSON (a surrounding markdown code fence is allowed)."""
    body = text.strip()
    body = re.sub(r"^```(?:json|Json|JSON)?\s*", "", body)
    body = re.sub(r"\s*```$", "", body)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def end_checker(text: str, end_phrase: str) -> bool:
    return text.strip().lower().endswith(end_phrase.strip().lower())


def no_comma(text: str) -> bool:
    return "," not in text


def postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip().lower()
    if marker == "p.p.s":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "p.s.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker) + r".*$"
    return bool(re.findall(pattern, text.lower(), flags=re.MULTILINE))


def quotation(text: str) -> bool:
    body = text.strip()
    return len(body) > 1 and body[0] == '"' and body[-1] == '"'


def title(text: str) -> bool:
    """A title in double angular brackets, ``<<like this>>``."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", text))


def number_placeholders(text: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[.*?\]", text)) >= num_placeholders


def number_paragraphs(text: str, num_paragraphs: int) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ``***``."""
    parts = re.split(r"\s?\*\*\*\s?", text)
    if any(not p.strip() for i, p in enumerate(parts) if 0 < i < len(parts) - 1):
        return False  # an empty paragraph in the middle
    return len([p for p in parts if p.strip()]) == num_paragraphs


CHECKS: dict[str, Check] = {
    "change_case:english_capital": all_capitals,
    "change_case:english_lowercase": all_lowercase,
    "length_constraints:number_words": number_words,
    "length_constraints:number_paragraphs": number_paragraphs,
    "detectable_format:number_bullet_lists": number_bullet_lists,
    "detectable_format:json_format": json_format,
    "detectable_format:title": title,
    "detectable_content:postscript": postscript,
    "detectable_content:number_placeholders": number_placeholders,
    "keywords:existence": keyword_existence,
    "keywords:forbidden_words": forbidden_words,
    "keywords:frequency": keyword_frequency,
    "startend:end_checker": end_checker,
    "startend:quotation": quotation,
    "punctuation:no_comma": no_comma,
}


def loose_variants(response: str) -> list[str]:
    """IFEval's loose variants: without the first and/or last line, with and without ``*``."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return trimmed + [t.replace("*", "") for t in trimmed]


def follows(response: str, instruction_id: str, kwargs: Mapping | None) -> tuple[bool, bool]:
    """(strict, loose) for one instruction."""
    check = CHECKS[instruction_id]
    arguments = {k: v for k, v in (kwargs or {}).items() if v is not None}
    strict = bool(response.strip()) and check(response, **arguments)
    loose = strict or any(v.strip() and check(v, **arguments) for v in loose_variants(response))
    return strict, loose


def instruction_scores(responses: Sequence[str], items: Sequence[Mapping]) -> dict[str, float]:
    """Prompt- and instruction-level accuracy, strict and loose, and each kind's (strict) accuracy.

    ``items[i]`` holds ``instruction_id_list`` and ``kwargs`` (one mapping per instruction).
    """
    prompt_strict, prompt_loose, inst_strict, inst_loose = [], [], [], []
    per_kind: dict[str, list[bool]] = {}
    for response, item in zip(responses, items, strict=True):
        results = [follows(response, iid, kw) for iid, kw in zip(item["instruction_id_list"], item["kwargs"], strict=True)]
        prompt_strict.append(all(s for s, _ in results))
        prompt_loose.append(all(lo for _, lo in results))
        inst_strict.extend(s for s, _ in results)
        inst_loose.extend(lo for _, lo in results)
        for iid, (strict, _) in zip(item["instruction_id_list"], results):
            per_kind.setdefault(iid, []).append(strict)
    mean = lambda values: sum(values) / len(values) if values else 0.0  # noqa: E731
    scores = {"prompt_level_strict_acc": mean(prompt_strict), "inst_level_strict_acc": mean(inst_strict),
              "prompt_level_loose_acc": mean(prompt_loose), "inst_level_loose_acc": mean(inst_loose)}
    scores.update({f"kind/{kind}": mean(values) for kind, values in sorted(per_kind.items())})
    return scores


def check_item(item: Mapping, where: str) -> None:
    """A data record's instructions are known kinds with arguments their checks take (one clear error otherwise)."""
    ids, kwargs = item.get("instruction_id_list"), item.get("kwargs")
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs) or not ids:
        raise ValueError(f"{where}: instruction_id_list and kwargs must be lists of the same, non-zero length")
    for iid, kw in zip(ids, kwargs):
        if iid not in CHECKS:
            raise ValueError(f"{where}: unknown instruction {iid!r} (known: {', '.join(sorted(CHECKS))})")
        try:
            CHECKS[iid]("probe", **{k: v for k, v in (kw or {}).items() if v is not None})
        except TypeError as exc:
            raise ValueError(f"{where}: instruction {iid!r}: {exc}") from exc


class InstructionFollowingSuite:
    """IFEval-style prompts answered greedily (chat template on) and checked by code, on every row.

    ``data``: ``builtin`` (24 hand-written prompts covering every kind, some with two
    instructions) or a JSONL file in IFEval's schema (``prompt``, ``instruction_id_list``,
    ``kwargs``; IFEval's own file works for the kinds implemented here). ``size``: the first N
    prompts (null: all).
    """

    headline = "prompt_level_strict_acc"

    def __init__(self, data: str = "builtin", size: int | None = None, max_new_tokens: int = 96):
        def checked(record: dict) -> dict:
            check_item(record, "this record")
            return record

        self.items = suite_records("instruction_following", data, "instruction_following.jsonl", checked, size)
        self.max_new_tokens = max_new_tokens

    def setup(self, model, formatter, members, device, batch_size: int) -> None:
        """Nothing to record on the base model."""

    def generation_requests(self) -> list[tuple[Example, int]]:
        """The greedy answers ``score`` will ask for (the runner may decode them ahead, with other suites')."""
        return [(Example(item["prompt"], ""), self.max_new_tokens) for item in self.items]

    def score(self, model, formatter, members, device, batch_size: int) -> dict[str, float]:
        examples = [Example(item["prompt"], "") for item in self.items]
        per_member = []
        for member in members:
            with member():
                responses = generate(model, formatter, examples, self.max_new_tokens, batch_size, device)
            per_member.append(instruction_scores(responses, self.items))
        return {key: sum(s[key] for s in per_member) / len(per_member) for key in per_member[0]}
