"""Tables of a sweep: every run's ``results.json``, grouped over seeds, as mean ± std.

    cl-runner-report outputs/multirun                    # every run under the folder
    cl-runner-report outputs/multirun --split task_sequence
    cl-runner-report outputs/multirun/experiment=edit_stream* --table edits

A run is named by its command-line overrides (``<run dir>/.hydra/overrides.yaml``) less those
that cannot change results; runs whose names differ only in ``seed`` form one row. Within a
table, overrides every row shares are left out of the row names (and printed above the
table). Runs without ``results.json`` are listed under the tables as unfinished or failed
(``error.txt`` holds the reason), never silently dropped.

``--table edits`` gives knowledge-editing runs their own columns, from the edit tasks' scores:
immediate (task t's scores right after it was learnt, the matrix's diagonal) and retention (the
last row), averaged over the edit tasks, with EasyEdit's locality and the change in fluency.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from cl_runner.config import is_resume_safe


@dataclass
class RunRecord:
    directory: Path
    overrides: dict[str, str]  # key -> value, results-changing overrides only
    results: dict | None
    error: str | None


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[dict], float | None]
    spec: str = ".3f"
    scale: float = 1.0
    spread: bool = True  # False: the value does not vary with the seed (sizes); print the mean alone


def _metric(name: str) -> Callable[[dict], float | None]:
    return lambda results: results["metrics"].get(name)


def _resource(name: str) -> Callable[[dict], float | None]:
    return lambda results: (results.get("resources") or {}).get(name)


COLUMNS = (
    Column("acc", _metric("acc")),
    Column("BWT", _metric("bwt")),
    Column("FWT", _metric("fwt")),
    Column("forgetting", _metric("forgetting")),
    Column("new-task acc", _metric("new_acc")),
    Column("general Δ", _metric("general_delta"), ".2f"),
    Column("trainable params (M)", _resource("trainable_parameters"), ".3g", 1e-6, spread=False),
    Column("MB per task", _resource("bytes_per_task"), ".3g", 1e-6, spread=False),
    Column("peak memory (GB)", _resource("peak_memory_bytes"), ".2f", 1e-9),
    Column("s per task", _resource("seconds_per_task"), ".0f"),
)


def _edit_score(name: str, retention: bool) -> Callable[[dict], float | None]:
    def value(results: dict) -> float | None:
        rows = results.get("task_scores") or []
        edits = [i for i, scores in enumerate(rows[0] if rows else []) if "rewrite_acc" in scores]  # every edit task has it
        if len(rows) < 2 or not edits:
            return None
        picked = [(rows[-1] if retention else rows[i + 1])[i].get(name) for i in edits]
        present = [v for v in picked if v is not None]
        return statistics.fmean(present) if present else None

    return value


def _fluency_delta(results: dict) -> float | None:
    fluency = results.get("fluency") or []
    return fluency[-1] - fluency[0] if len(fluency) > 1 else None


EDIT_COLUMNS = (
    *(Column(f"{title} (imm.)", _edit_score(name, False), ".3f") for title, name in (("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("neighbourhood", "neighborhood"), ("score", "edit_score"))),
    *(Column(f"{title} (ret.)", _edit_score(name, True), ".3f") for title, name in (("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("neighbourhood", "neighborhood"), ("score", "edit_score"))),
    Column("locality (ret.)", _edit_score("locality", True)),
    Column("general Δ", _metric("general_delta"), ".2f"),
    Column("fluency Δ", _fluency_delta, ".2f"),
    Column("s per task", _resource("seconds_per_task"), ".0f"),
)
TABLES = {"default": COLUMNS, "edits": EDIT_COLUMNS}


def read_overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides that can change results, as ``{key: value}``."""
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    pairs = (o.split("=", 1) for o in overrides or [] if "=" in o)
    return {key.lstrip("+~"): value for key, value in pairs if not is_resume_safe(key.lstrip("+~"))}


def find_runs(roots: Sequence[Path]) -> list[RunRecord]:
    """Every run directory (one holding ``state.json`` or ``results.json``) under ``roots``."""
    directories = sorted({p.parent for root in roots for name in ("state.json", "results.json", "error.txt") for p in Path(root).rglob(name)})
    records = []
    for directory in directories:
        results_file, error_file = directory / "results.json", directory / "error.txt"
        results = json.loads(results_file.read_text()) if results_file.exists() else None
        error = error_file.read_text().strip() or None if error_file.exists() else None
        records.append(RunRecord(directory, read_overrides(directory), results, error))
    return records


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def format_cell(values: Sequence[float | None], column: Column) -> str:
    present = [v * column.scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return "-"
    mean, std = mean_std(present)
    return f"{mean:{column.spec}} ± {std:{column.spec}}" if len(present) > 1 and column.spread else f"{mean:{column.spec}}"


def _name(overrides: dict[str, str], shared: dict[str, str], group_over: str) -> str:
    """The overrides that tell this row from the others (all of them when nothing does: one row)."""
    own = [f"{k}={v}" for k, v in overrides.items() if k != group_over and shared.get(k) != v]
    return " ".join(own or [f"{k}={v}" for k, v in overrides.items() if k != group_over]) or "(defaults)"


def markdown_table(records: Sequence[RunRecord], columns: Sequence[Column] = COLUMNS, group_over: str = "seed") -> str:
    """One row per distinct run name (overrides less ``group_over``): mean ± std of each column over its runs."""
    finished = [r for r in records if r.results is not None]
    if not finished:
        return "(no finished runs)"
    keys = [dict(r.overrides) for r in finished]
    shared = {k: v for k, v in keys[0].items() if all(other.get(k) == v for other in keys)}
    groups: dict[str, list[RunRecord]] = {}
    for record in finished:
        groups.setdefault(_name(record.overrides, shared, group_over), []).append(record)
    lines = []
    if shared:
        lines.append("Shared: `" + " ".join(f"{k}={v}" for k, v in shared.items() if k != group_over) + "`\n")
    lines.append("| run | " + group_over + "s | " + " | ".join(c.title for c in columns) + " |")
    lines.append("|---" * (len(columns) + 2) + "|")
    for name, members in groups.items():
        seeds = ",".join(sorted(m.overrides.get(group_over, "-") for m in members))
        cells = [format_cell([c.value(m.results) for m in members], c) for c in columns]
        lines.append(f"| `{name}` | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(records: Sequence[RunRecord], split: str | None = None, columns: Sequence[Column] = COLUMNS) -> str:
    """Markdown tables (one per value of ``split``, if given) and the list of runs without results."""
    parts = []
    values = sorted({r.overrides.get(split, "-") for r in records}) if split else [None]
    for value in values:
        chosen = [r for r in records if value is None or r.overrides.get(split, "-") == value]
        if value is not None:
            parts.append(f"### {split}={value}\n")
        parts.append(markdown_table(chosen, columns) + "\n")
    missing = [r for r in records if r.results is None]
    if missing:
        parts.append(f"{len(missing)} run(s) without results.json:")
        parts.extend(f"- {r.directory}: {'failed: ' + r.error.splitlines()[-1] if r.error else 'unfinished'}" for r in missing)
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cl-runner-report", description="Mean ± std over seeds of every run's results.json under the given folders.")
    parser.add_argument("folders", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    parser.add_argument("--split", default=None, help="one table per value of this override, e.g. task_sequence")
    parser.add_argument("--table", default="default", choices=sorted(TABLES), help="columns: default (the matrix metrics and resources) or edits (editing scores)")
    args = parser.parse_args(argv)
    absent = [str(f) for f in args.folders if not f.is_dir()]
    if absent:
        sys.exit(f"cl-runner-report: error: not a folder: {', '.join(absent)}")
    records = find_runs(args.folders)
    if not records:
        sys.exit(f"cl-runner-report: error: no run folders (with state.json or results.json) under {', '.join(map(str, args.folders))}")
    print(report(records, args.split, TABLES[args.table]))


if __name__ == "__main__":
    main()
