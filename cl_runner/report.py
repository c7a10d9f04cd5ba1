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
``--table learners``: the default columns and the task-identification accuracy of methods that pick
the adapter from the input (CoLoR): the last row's share of examples routed to their own task.
``--table abilities``: the general-ability suites' change from the base model to the last row
(knowledge retention and drift as their last-row values, which are relative to the base already).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
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
def _ability_last(suite: str, score: str, series: str = "abilities") -> Callable[[dict], float | None]:
    """The suite score's last row; with ``series="abilities_delta"``, its change from the base model (row 0)."""
    def value(results: dict) -> float | None:
        values = ((results.get(series) or {}).get(suite) or {}).get(score) or []
        return values[-1] if values else None

    return value


def _ability_change(suite: str, score: str) -> Callable[[dict], float | None]:
    return _ability_last(suite, score, "abilities_delta")


ABILITY_COLUMNS = (
    Column("acc", _metric("acc")),
    Column("BWT", _metric("bwt")),
    Column("general Δ", _metric("general_delta"), ".2f"),
    Column("instructions Δ (strict)", _ability_change("instruction_following", "prompt_level_strict_acc"), ".2f"),
    Column("knowledge retained", _ability_last("knowledge_retention", "retained"), ".2f"),
    Column("arithmetic Δ", _ability_change("arithmetic", "accuracy"), ".2f"),
    Column("commonsense Δ", _ability_change("commonsense", "acc"), ".2f"),
    Column("code pass@1 Δ", _ability_change("code", "pass@1"), ".2f"),
    Column("drift KL", _ability_last("instruction_drift", "kl"), ".2f"),
    Column("drift ROUGE-L", _ability_last("instruction_drift", "rouge_l"), ".2f"),
)


def _task_identification(results: dict) -> float | None:
    """A routing method's share of test examples sent to their own task's adapter in the last row
    (CoLoR's ``method_reports[-1]["task_identification"]``, one share per task), averaged over the tasks."""
    last = (results.get("method_reports") or [None])[-1] or {}
    shares = last.get("task_identification") or {}
    return statistics.fmean(shares.values()) if shares else None


LEARNER_COLUMNS = (*COLUMNS, Column("task-id acc", _task_identification))
TABLES = {"default": COLUMNS, "learners": LEARNER_COLUMNS, "edits": EDIT_COLUMNS, "abilities": ABILITY_COLUMNS}


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


@dataclass
class Group:
    """One row of a table: the runs that differ only in ``group_over`` (the seeds)."""

    name: str
    seeds: str
    members: list[RunRecord]


def group_runs(records: Sequence[RunRecord], group_over: str = "seed") -> tuple[dict[str, str], list[Group]]:
    """The overrides every finished run shares, and the finished runs grouped by name (overrides less ``group_over``)."""
    finished = [r for r in records if r.results is not None]
    if not finished:
        return {}, []
    keys = [dict(r.overrides) for r in finished]
    shared = {k: v for k, v in keys[0].items() if all(other.get(k) == v for other in keys)}
    groups: dict[str, list[RunRecord]] = {}
    for record in finished:
        groups.setdefault(_name(record.overrides, shared, group_over), []).append(record)
    rows = [Group(name, ",".join(sorted(m.overrides.get(group_over, "-") for m in members)), members) for name, members in groups.items()]
    return {k: v for k, v in shared.items() if k != group_over}, rows


def column_values(group: Group, column: Column) -> list[float]:
    """The column's values over the group's runs, scaled, missing ones left out."""
    values = [column.value(m.results) for m in group.members]
    return [v * column.scale for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]


def lower_is_better(group: Group) -> bool:
    """The row's task scores are perplexities (results.json written before the key existed: accuracy)."""
    return group.members[0].results.get("higher_is_better", True) is False


def markdown_table(records: Sequence[RunRecord], columns: Sequence[Column] = COLUMNS, group_over: str = "seed") -> str:
    """One row per distinct run name (overrides less ``group_over``): mean ± std of each column over its runs."""
    shared, groups = group_runs(records, group_over)
    if not groups:
        return "(no finished runs)"
    lines = []
    if shared:
        lines.append("Shared: `" + " ".join(f"{k}={v}" for k, v in shared.items()) + "`\n")
    lower = [g.name for g in groups if lower_is_better(g)]
    if lower:
        lines.append("Lower is better for the task scores (perplexity) of " + ", ".join(f"`{n}`" for n in lower)
                     + ": acc and new-task acc are in its units; BWT < 0 and forgetting > 0 still mean forgetting.\n")
    lines.append("| run | " + group_over + "s | " + " | ".join(c.title for c in columns) + " |")
    lines.append("|---" * (len(columns) + 2) + "|")
    for group in groups:
        cells = [format_cell([c.value(m.results) for m in group.members], c) for c in columns]
        lines.append(f"| `{group.name}` | {group.seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "Δ": r"$\Delta$"}


def _latex_escape(text: str) -> str:
    return re.sub("|".join(re.escape(c) for c in LATEX_SPECIALS), lambda m: LATEX_SPECIALS[m.group()], text)  # one pass


def latex_table(records: Sequence[RunRecord], columns: Sequence[Column] = COLUMNS, group_over: str = "seed") -> str:
    """The same table as a LaTeX ``tabular`` (booktabs), mean $\\pm$ std per cell."""
    shared, groups = group_runs(records, group_over)
    if not groups:
        return "% no finished runs"
    lines = [f"% shared: {' '.join(f'{k}={v}' for k, v in shared.items())}"] if shared else []
    lines += [r"\begin{tabular}{l" + "r" * len(columns) + "}", r"\toprule",
              "run & " + " & ".join(_latex_escape(c.title) for c in columns) + r" \\", r"\midrule"]
    for group in groups:
        cells = []
        for column in columns:
            values = column_values(group, column)
            if not values:
                cells.append("--")
                continue
            mean, std = mean_std(values)
            cells.append(f"${mean:{column.spec}} \\pm {std:{column.spec}}$" if len(values) > 1 and column.spread else f"${mean:{column.spec}}$")
        lines.append(_latex_escape(group.name) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def csv_table(records: Sequence[RunRecord], columns: Sequence[Column] = COLUMNS, group_over: str = "seed") -> str:
    """The same table as CSV: per column its mean, sample std and number of runs, unrounded."""
    _, groups = group_runs(records, group_over)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["run", group_over + "s", *(f"{c.title} {part}" for c in columns for part in ("mean", "std", "n"))])
    for group in groups:
        row = [group.name, group.seeds]
        for column in columns:
            values = column_values(group, column)
            mean, std = mean_std(values) if values else ("", "")
            row += [mean, std if len(values) > 1 else "", len(values)]  # no spread from one run
        writer.writerow(row)
    return out.getvalue()


FORMATS = {"markdown": markdown_table, "latex": latex_table, "csv": csv_table}


def report(records: Sequence[RunRecord], split: str | None = None, columns: Sequence[Column] = COLUMNS, table_format: str = "markdown") -> str:
    """The tables (one per value of ``split``, if given); in Markdown, also the runs without results.

    CSV gets one table with the split's value as its first column; LaTeX one ``tabular`` per
    value under a comment naming it.
    """
    values = sorted({r.overrides.get(split, "-") for r in records}) if split else [None]
    chosen = {value: [r for r in records if value is None or r.overrides.get(split, "-") == value] for value in values}
    if table_format == "csv":
        tables = [csv_table(rows, columns) for rows in chosen.values()]
        if split is None:
            return tables[0]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for index, (value, table) in enumerate(zip(values, tables)):
            rows = list(csv.reader(io.StringIO(table)))
            writer.writerows([[split, *rows[0]]] if index == 0 else [])
            writer.writerows([value, *row] for row in rows[1:])
        return out.getvalue()
    heading = (lambda value: f"### {split}={value}\n") if table_format == "markdown" else (lambda value: f"% {split}={value}")
    parts = []
    for value, rows in chosen.items():
        if value is not None:
            parts.append(heading(value))
        parts.append(FORMATS[table_format](rows, columns) + "\n")
    if table_format == "markdown":
        parts.append(missing_runs(records))
    return "\n".join(p for p in parts if p)


def missing_runs(records: Sequence[RunRecord]) -> str:
    missing = [r for r in records if r.results is None]
    if not missing:
        return ""
    lines = [f"{len(missing)} run(s) without results.json:"]
    lines.extend(f"- {r.directory}: {'failed: ' + r.error.splitlines()[-1] if r.error else 'unfinished'}" for r in missing)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cl-runner-report", description="Mean ± std over seeds of every run's results.json under the given folders.")
    parser.add_argument("folders", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    parser.add_argument("--split", default=None, help="one table per value of this override, e.g. task_sequence")
    parser.add_argument("--table", default="default", choices=sorted(TABLES), help="columns: default (the matrix metrics and resources), learners (default and task-identification accuracy), edits (editing scores) or abilities (the general-ability suites and drift, last row against the base model)")
    parser.add_argument("--format", default="markdown", choices=sorted(FORMATS), help="markdown (with the runs without results), latex or csv")
    parser.add_argument("--plots", type=Path, default=None, help="also write figures into this folder (cl_runner/report_plots.py)")
    args = parser.parse_args(argv)
    absent = [str(f) for f in args.folders if not f.is_dir()]
    if absent:
        sys.exit(f"cl-runner-report: error: not a folder: {', '.join(absent)}")
    records = find_runs(args.folders)
    if not records:
        sys.exit(f"cl-runner-report: error: no run folders (with state.json or results.json) under {', '.join(map(str, args.folders))}")
    print(report(records, args.split, TABLES[args.table], args.format))
    if args.format != "markdown" and missing_runs(records):
        print(missing_runs(records), file=sys.stderr)  # the table on stdout stays machine-readable
    if args.plots is not None:
        from cl_runner.report_plots import write_plots

        for path in write_plots(records, args.plots):
            print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
