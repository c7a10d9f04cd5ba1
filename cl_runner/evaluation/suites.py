"""General-ability suites: scored on every row of the matrix next to the tasks.

A run's suites are the entries of ``eval.suites`` (conf/eval/default.yaml), each a
``_target_`` class with its settings; ``~eval.suites.<name>`` drops one, ``eval=full`` runs
them at full size. A suite class provides:

    headline: str      the score that sums the suite up (the plot, the report)
    setup(model, formatter, members, device, batch_size) -> None
                       once, before a resumed run loads its checkpoints; ``members`` enter the
                       base model (e.g. to record its own answers)
    score(model, formatter, members, device, batch_size) -> dict[str, float]
                       one row: the model as deployed after the tasks learnt so far (the
                       members are the method's ensemble, usually one), in eval mode
    generation_requests() -> list[(Example, max_new_tokens)]    (optional)
                       the greedy answers the next ``score`` will ask generate() for: the
                       runner decodes every suite's (and the probe's) together, in shared
                       batches, and generate() inside ``score`` reads them (``use_decoded``)
    setup_generation_requests() -> list[(Example, max_new_tokens)]    (optional)
                       the same for ``setup`` (the base model's answers; row 0 reuses them)
    scores_row(row, rows) -> bool    (optional)
                       whether to score row ``row`` of ``rows`` (e.g. lm-eval only at chosen
                       rows); a row it skips holds null

Each row's scores go to ``results.json`` under ``abilities`` (with their change from row 0 under
``abilities_delta``), to ``train_log.jsonl`` and to W&B as ``ability/<suite>/<score>``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from cl_runner.errors import UserError
from cl_runner.evaluation.generation import decode_ahead

T = TypeVar("T")
DATA_DIR = Path(__file__).parent / "data"  # the suites' built-in items


def suite_records(suite: str, data: str, builtin: str, convert: Callable[[dict], T], size: int | None = None) -> list[T]:
    """A suite's items from JSONL: ``DATA_DIR/builtin`` when ``data`` is ``builtin``, else the file
    ``data``; each line's object passed through ``convert``, the first ``size`` kept (null: all).
    A missing file, a bad line or a bad size is one UserError naming the suite (and file and line)."""
    if size is not None and (not isinstance(size, int) or size < 1):
        raise UserError(f"eval.suites.{suite}.size must be a positive integer or null, got {size!r}")
    path = DATA_DIR / builtin if data == "builtin" else Path(data)
    if not path.is_file():
        raise UserError(f"eval.suites.{suite}.data: no file {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(convert(json.loads(line)))
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise UserError(f"eval.suites.{suite}: {path} line {number}: {exc}") from exc
    return records[:size]


def build_suites(suites: Mapping | None) -> dict[str, object]:
    """The configured suites by name (an entry set to null is left out)."""
    from cl_runner.config import build

    built = {}
    for name, node in (suites or {}).items():
        if node is None:
            continue
        if "_target_" not in node:  # settings for a suite the chosen eval config does not have
            raise UserError(f"eval.suites.{name} has settings but no _target_: the chosen eval config has no suite '{name}' (drop the settings, or add its _target_)")
        built[name] = build(node, f"eval.suites.{name}")
    return built


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """No dropout while a suite runs (a row after a trained task answers as row 0 does); the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def setup_suite(suite, model, formatter, base_members, device, batch_size: int) -> None:
    with _eval_mode(model):
        suite.setup(model, formatter, base_members, device, batch_size)


def score_suite(suite, model, formatter, members, device, batch_size: int) -> dict[str, float | None]:
    with _eval_mode(model):
        scores = suite.score(model, formatter, members, device, batch_size)
    return {key: None if value is None else float(value) for key, value in scores.items()}


def scores_row(suite, row: int, rows: int) -> bool:
    """Whether ``suite`` is scored on row ``row`` of ``rows`` (every row unless it has ``scores_row``)."""
    chooser = getattr(suite, "scores_row", None)
    return chooser is None or bool(chooser(row, rows))


def generation_requests(suites, at_setup: bool = False) -> list:
    """Every ``(example, max_new_tokens)`` the suites' next ``score`` (``setup`` when ``at_setup``) will decode."""
    method = "setup_generation_requests" if at_setup else "generation_requests"
    return [request for suite in suites for request in getattr(suite, method, list)()]


def decode_for_row(model, formatter, member, requests, batch_size: int, device, skip: Mapping = {}) -> dict:  # noqa: B006 - read only
    """``decode_ahead`` of the requests not in ``skip``, in eval mode, with ``member`` (the one model that answers) entered."""
    with _eval_mode(model), member():
        return decode_ahead(model, formatter, requests, batch_size, device, skip)


def ability_series(rows: Sequence[Mapping[str, Mapping[str, float]] | None]) -> tuple[dict, dict]:
    """Per-row suite scores -> (``{suite: {score: [per row]}}``, the same as changes from row 0)."""
    series: dict[str, dict[str, list]] = {}
    for row, abilities in enumerate(rows):
        for suite, scores in (abilities or {}).items():
            for key, value in scores.items():
                values = series.setdefault(suite, {}).setdefault(key, [])
                values.extend([None] * (row - len(values)))  # rows the suite skipped (or before it had this score)
                values.append(value)
    for scores in series.values():
        for values in scores.values():
            values.extend([None] * (len(rows) - len(values)))
    deltas = {suite: {key: [None if v is None or values[0] is None else v - values[0] for v in values] for key, values in scores.items()}
              for suite, scores in series.items()}
    return series, deltas
