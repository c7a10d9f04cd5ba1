"""General-ability suites: scored on every row of the matrix next to the tasks.

A run's suites are the entries of ``eval.suites`` (conf/eval/default.yaml), each a
``_target_`` class with its settings; ``~eval.suites.<name>`` drops one, ``eval=full`` runs
them at full size. A suite class provides:

    headline: str      the score that sums the suite up (the plot, the report)
    setup(model, formatter, device, batch_size) -> None
                       once, on the base model, before a resumed run loads its checkpoints
                       (e.g. to record the base model's own answers)
    score(model, formatter, members, device, batch_size) -> dict[str, float]
                       one row: the model as deployed after the tasks learnt so far (the
                       members are the method's ensemble, usually one), in eval mode

Each row's scores go to ``results.json`` under ``abilities`` (with their change from row 0 under
``abilities_delta``), to ``train_log.jsonl`` and to W&B as ``ability/<suite>/<score>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def build_suites(suites: Mapping | None) -> dict[str, object]:
    """The configured suites by name (an entry set to null is left out)."""
    from cl_runner.config import build

    return {name: build(node, f"eval.suites.{name}") for name, node in (suites or {}).items() if node is not None}


def score_suite(suite, model, formatter, members, device, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()  # no dropout: a row after a trained task answers as row 0 does
    try:
        return {key: float(value) for key, value in suite.score(model, formatter, members, device, batch_size).items()}
    finally:
        model.train(was_training)


def ability_series(rows: Sequence[Mapping[str, Mapping[str, float]] | None]) -> tuple[dict, dict]:
    """Per-row suite scores -> (``{suite: {score: [per row]}}``, the same as changes from row 0)."""
    series: dict[str, dict[str, list]] = {}
    for row, abilities in enumerate(rows):
        for suite, scores in (abilities or {}).items():
            for key, value in scores.items():
                series.setdefault(suite, {}).setdefault(key, [None] * row).append(value)
    for scores in series.values():
        for values in scores.values():
            values.extend([None] * (len(rows) - len(values)))
    deltas = {suite: {key: [None if v is None or values[0] is None else v - values[0] for v in values] for key, values in scores.items()}
              for suite, scores in series.items()}
    return series, deltas
