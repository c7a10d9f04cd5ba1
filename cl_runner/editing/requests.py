"""Edit requests: one counterfactual fact to write into the model, with the prompts that test it.

Two schemas are read, since users bring both: CounterFact's (``requested_rewrite: {prompt,
subject, target_new: {str}, target_true: {str}}``, ``paraphrase_prompts``,
``neighborhood_prompts``, ``generation_prompts``) and zsRE's as EasyEdit ships it (``src``,
``subject``, ``alt``, ``answers``/``pred``, ``rephrase``, ``loc``, ``loc_ans``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cl_runner.errors import UserError


@dataclass(frozen=True)
class EditRequest:
    """``prompt`` holds ``{}`` where the subject goes: ``"The capital of {} is"``."""

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    # Prompts about other subjects with the same relation, each with the answer it should keep
    # (CounterFact: the edit's target_true; zsRE: the unrelated question's own answer).
    neighborhood: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()

    @property
    def rewrite_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject)


def _require(record: Mapping, key: str, where: str):
    if key not in record:
        raise UserError(f"{where}: missing '{key}'")
    return record[key]


def _text(value, key: str, where: str) -> str:
    if isinstance(value, Mapping):  # CounterFact nests strings as {"str": ..., "id": ...}
        value = value.get("str")
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value.strip()


def _strings(value, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: '{key}' must be a list of strings")
    return tuple(value)


def from_counterfact(record: Mapping, where: str) -> EditRequest:
    rewrite = _require(record, "requested_rewrite", where)
    if isinstance(rewrite, list):  # some CounterFact files wrap the rewrite in a one-item list
        rewrite = rewrite[0] if len(rewrite) == 1 else _require({}, "requested_rewrite (one item)", where)
    prompt = _text(_require(rewrite, "prompt", where), "requested_rewrite.prompt", where)
    subject = _text(_require(rewrite, "subject", where), "requested_rewrite.subject", where)
    if "{}" not in prompt:
        raise UserError(f"{where}: requested_rewrite.prompt must hold '{{}}' where the subject goes, got {prompt!r}")
    target_true = _text(rewrite["target_true"], "target_true", where) if rewrite.get("target_true") else None
    neighborhood = _strings(record.get("neighborhood_prompts"), "neighborhood_prompts", where)
    if neighborhood and target_true is None:
        raise UserError(f"{where}: neighborhood_prompts need requested_rewrite.target_true (the answer they keep)")
    return EditRequest(
        case_id=str(record.get("case_id", where)),
        prompt=prompt,
        subject=subject,
        target_new=_text(_require(rewrite, "target_new", where), "requested_rewrite.target_new", where),
        target_true=target_true,
        paraphrase_prompts=_strings(record.get("paraphrase_prompts"), "paraphrase_prompts", where),
        neighborhood=tuple((p, target_true) for p in neighborhood),
        generation_prompts=_strings(record.get("generation_prompts"), "generation_prompts", where),
    )


def from_zsre(record: Mapping, where: str) -> EditRequest:
    question = _text(_require(record, "src", where), "src", where)
    subject = _text(_require(record, "subject", where), "subject", where)
    if subject not in question:
        raise UserError(f"{where}: subject {subject!r} does not occur in src {question!r}")
    answers = record.get("answers") or record.get("pred")
    target_true = _text(answers[0] if isinstance(answers, list) else answers, "answers", where) if answers else None
    neighborhood = ()
    if record.get("loc"):
        loc_answer = record.get("loc_ans")
        neighborhood = ((_text(record["loc"], "loc", where), _text(loc_answer, "loc_ans", where)),)
    return EditRequest(
        case_id=str(record.get("case_id", where)),
        prompt=question.replace(subject, "{}", 1),
        subject=subject,
        target_new=_text(_require(record, "alt", where), "alt", where),
        target_true=target_true,
        paraphrase_prompts=_strings(record.get("rephrase"), "rephrase", where),
        neighborhood=neighborhood,
    )


SCHEMAS = {"counterfact": from_counterfact, "zsre": from_zsre}


def parse_requests(records: list[Mapping], schema: str, source: str) -> list[EditRequest]:
    """Edit requests from records of ``schema`` (``counterfact`` | ``zsre``); ``source`` names the file in errors."""
    if schema not in SCHEMAS:
        raise UserError(f"edit schema must be one of {sorted(SCHEMAS)}, got {schema!r}")
    return [SCHEMAS[schema](record, f"{source}, record {i + 1}") for i, record in enumerate(records)]
