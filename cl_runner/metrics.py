"""Continual-learning metrics as pure functions of the accuracy matrix.

``R`` has T+1 rows and T columns: ``R[0][i]`` is the base model on task i (before any
training) and ``R[t][i]`` the score on task i after training tasks 1..t. Task and step
numbers in the docstrings are 1-based as in the GEM paper; Python indices are 0-based.
Every reported figure is recomputable from the saved matrix with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> int:
    """Return T after checking that R is a complete (T+1) x T matrix."""
    if not R:
        raise ValueError("accuracy matrix is empty")
    num_tasks = len(R[0])
    if num_tasks == 0 or len(R) != num_tasks + 1 or any(len(row) != num_tasks for row in R):
        raise ValueError(f"accuracy matrix must be (T+1) x T, got {len(R)} rows of lengths {[len(r) for r in R]}")
    return num_tasks


def final_accuracy(R: Matrix) -> float:
    """AA / OP / "Last": mean score over all tasks after the whole sequence."""
    T = _check(R)
    return sum(R[T]) / T


def average_accuracy(R: Matrix) -> float:
    """Avg: mean over steps t of the mean score on the tasks seen so far (1..t)."""
    T = _check(R)
    return sum(sum(R[t][:t]) / t for t in range(1, T + 1)) / T


def new_task_accuracy(R: Matrix) -> float:
    """Plasticity: mean of the diagonal R[t][t], each task right after it was learnt."""
    T = _check(R)
    return sum(R[t][t - 1] for t in range(1, T + 1)) / T


def backward_transfer(R: Matrix) -> float | None:
    """BWT, GEM form: mean over tasks i < T of R[T][i] - R[i][i] (divides by T-1, not T)."""
    T = _check(R)
    if T < 2:
        return None
    return sum(R[T][i - 1] - R[i][i - 1] for i in range(1, T)) / (T - 1)


def forward_transfer(R: Matrix) -> float | None:
    """FWT, GEM form: mean over tasks i >= 2 of R[i-1][i] - R[0][i] (uses the base-model row)."""
    T = _check(R)
    if T < 2:
        return None
    return sum(R[i - 1][i - 1] - R[0][i - 1] for i in range(2, T + 1)) / (T - 1)


def per_task_forgetting(R: Matrix) -> list[float]:
    """For each task i < T: best score over steps 1..T-1 minus the final score (Chaudhry et al.)."""
    T = _check(R)
    return [max(R[t][i - 1] for t in range(1, T)) - R[T][i - 1] for i in range(1, T)]


def forgetting(R: Matrix) -> float | None:
    """Mean of :func:`per_task_forgetting` over tasks 1..T-1."""
    values = per_task_forgetting(R)
    return sum(values) / len(values) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def temporal_split(R: Matrix) -> dict:
    """TiC-LM's split of the rows after training (row 0, the base model, is left out) by where an
    evaluated task lies in time against the last one learnt: ``in_distribution`` averages the
    diagonal (the task just learnt), ``backward`` the tasks learnt before it (lower triangle),
    ``forward`` the tasks still to come (upper triangle). In the task metric's own units."""
    T = _check(R)
    return {
        "in_distribution": _mean([R[t][t - 1] for t in range(1, T + 1)]),
        "backward": _mean([R[t][i] for t in range(1, T + 1) for i in range(t - 1)]),
        "forward": _mean([R[t][i] for t in range(1, T + 1) for i in range(t, T)]),
    }


def all_metrics(R: Matrix, general: Sequence[float] | None = None, lower_is_better: bool = False) -> dict:
    """Every summary metric of a run, as stored in ``results.json["metrics"]``.

    With ``lower_is_better`` (perplexity), the transfer metrics are computed on -R, so that their
    sign means what it means for accuracy: BWT < 0 and forgetting > 0 when old tasks got worse,
    FWT > 0 when learning helped tasks still to come. The means (acc, avg_acc, new_acc) stay in
    the metric's own units.
    """
    signed = [[-v for v in row] for row in R] if lower_is_better else R
    metrics = {
        "acc": final_accuracy(R),
        "avg_acc": average_accuracy(R),
        "bwt": backward_transfer(signed),
        "fwt": forward_transfer(signed),
        "forgetting": forgetting(signed),
        "per_task_forgetting": per_task_forgetting(signed),
        "new_acc": new_task_accuracy(R),
        "temporal": temporal_split(R),
    }
    if general:
        metrics["general_base"] = general[0]
        metrics["general_final"] = general[-1]
        metrics["general_delta"] = general[-1] - general[0]
    return metrics
