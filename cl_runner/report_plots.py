"""Figures of a sweep for ``cl-runner-report --plots DIR``: the rows of the report's tables as pictures.

- ``<row>_matrix.png``: the accuracy matrix averaged over the row's seeds;
- ``<row>_curves.png``: each task's score after every step (mean over seeds, ± one std band);
- ``forgetting.png``: per-task forgetting (metrics.per_task_forgetting), one bar per row;
- ``general_delta.png``: the change of the general probe, one bar per row (± one std).

Runs are grouped as in the tables (runs that differ only in the seed form one row). Rows over
different task lists get a forgetting figure each.
"""

from __future__ import annotations

import hashlib
import re
import statistics
from pathlib import Path
from collections.abc import Sequence

from cl_runner.atomic_io import write_file_atomic
from cl_runner.metrics import per_task_forgetting
from cl_runner.plots import plot_heatmap
from cl_runner.report import Group, RunRecord, group_runs, lower_is_better


def mean_matrix(group: Group) -> list[list[float]]:
    """Element-wise mean of the members' accuracy matrices (which must share their tasks)."""
    matrices = [m.results["acc_matrix"] for m in group.members]
    return [[statistics.fmean(values) for values in zip(*rows)] for rows in zip(*matrices)]


def slug(name: str) -> str:
    """A file name for a row; long names are cut and tagged with a digest so two rows never share one."""
    text = re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "run"
    return text if len(text) <= 120 else text[:110] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    _pyplot().close(fig)
    return path


def plot_curves(group: Group, path: Path) -> Path:
    plt = _pyplot()
    tasks = group.members[0].results["tasks"]
    matrices = [m.results["acc_matrix"] for m in group.members]
    fig, ax = plt.subplots(figsize=(1.1 * len(tasks) + 4, 4))
    steps = range(len(tasks) + 1)
    for i, task in enumerate(tasks):
        per_step = [[matrix[t][i] for matrix in matrices] for t in steps]
        mean = [statistics.fmean(v) for v in per_step]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_step]
        line, = ax.plot(steps, mean, marker="o", label=task)
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.15)
        ax.axvline(i + 1, color=line.get_color(), linestyle=":", linewidth=0.8)  # where the task was learnt
    ax.set_xticks(list(steps), labels=["base", *tasks], rotation=30, ha="right")
    ax.set_xlabel("after learning")
    if lower_is_better(group):  # perplexities: their own range
        ax.set_ylabel("score (lower is better)")
    else:
        ax.set_ylabel("score")
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{group.name} (seeds {group.seeds})")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_forgetting(groups: Sequence[Group], path: Path) -> Path:
    plt = _pyplot()
    tasks = groups[0].members[0].results["tasks"][:-1]  # the last task cannot be forgotten yet
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) * max(1, len(groups) / 3) + 3, 4))
    width = 0.8 / len(groups)
    for g, group in enumerate(groups):
        per_run = [m.results["metrics"].get("per_task_forgetting") or per_task_forgetting(m.results["acc_matrix"]) for m in group.members]  # stored: signed for the metric's direction
        means = [statistics.fmean(values) for values in zip(*per_run)]
        ax.bar([i + g * width for i in range(len(tasks))], means, width, label=group.name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], labels=tasks, rotation=30, ha="right")
    ax.set_ylabel("forgetting (best earlier score - final)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_general_delta(groups: Sequence[Group], path: Path) -> Path | None:
    plt = _pyplot()
    rows = []
    for group in groups:
        deltas = [m.results["metrics"].get("general_delta") for m in group.members]
        deltas = [d for d in deltas if d is not None]
        if deltas:
            rows.append((group.name, statistics.fmean(deltas), statistics.stdev(deltas) if len(deltas) > 1 else 0.0))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(0.6 * len(rows) + 3, 4))
    ax.bar(range(len(rows)), [m for _, m, _ in rows], yerr=[s for _, _, s in rows], capsize=3)
    ax.set_xticks(range(len(rows)), labels=[n for n, _, _ in rows], rotation=40, ha="right", fontsize=8)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("general probe: last row - base")
    fig.tight_layout()
    return _save(fig, path)


def write_plots(records: Sequence[RunRecord], folder: Path, group_over: str = "seed") -> list[Path]:
    """Every figure above for the finished runs of ``records``; returns the files written."""
    folder = Path(folder)
    _, groups = group_runs(records, group_over)
    written = []
    by_tasks: dict[tuple, list[Group]] = {}
    for group in groups:
        tasks = group.members[0].results["tasks"]
        if any(m.results["tasks"] != tasks for m in group.members):
            continue  # seeds of one row over different tasks: no common matrix to average
        name = slug(group.name)
        written.append(plot_heatmap(tasks, mean_matrix(group), folder / f"{name}_matrix.png", title=f"{group.name}: mean R[t][i] (seeds {group.seeds})",
                                    lower_is_better=lower_is_better(group)))
        written.append(plot_curves(group, folder / f"{name}_curves.png"))
        by_tasks.setdefault(tuple(tasks), []).append(group)
    for index, same_tasks in enumerate(by_tasks.values()):
        if len(same_tasks[0].members[0].results["tasks"]) > 1:
            suffix = "" if len(by_tasks) == 1 else f"_{index + 1}"
            written.append(plot_forgetting(same_tasks, folder / f"forgetting{suffix}.png"))
    general = plot_general_delta(groups, folder / "general_delta.png")
    return written + ([general] if general else [])
