"""The results.json record: the accuracy matrix, its metrics, and everything needed to place the run in a table."""

from __future__ import annotations

from cl_runner.evaluation.suites import ability_series
from cl_runner.metrics import all_metrics
from cl_runner.provenance import git_state, package_versions
from cl_runner.resources import resource_summary


def build_results(task_names, acc_matrix, general, timing, train_stats, config, task_scores=None, invocations=None, method_reports=None, fluency=None,
                  abilities=None, lower_is_better: bool = False) -> dict:
    """``acc_matrix[t][i]`` holds task i's own metric; ``task_scores[t][i]`` every score it has (``acc`` and ``acc_norm``).

    ``versions`` and ``git`` describe the invocation that finished the run; ``invocations``
    lists every invocation that contributed rows (a resumed run may mix devices or versions).
    """
    ability_scores, ability_deltas = ability_series(abilities or [])
    return {
        "tasks": list(task_names),
        "acc_matrix": acc_matrix,
        "task_scores": task_scores or [],
        "method_reports": list(method_reports or []),
        "metrics": all_metrics(acc_matrix, general or None, lower_is_better),
        "metric_notes": "row 0 = base model, row t = after task t; acc_matrix holds each task's own metric, task_scores all of them; BWT and FWT in the GEM form (divide by T-1)"
                        + ("; lower is better (perplexity): BWT, FWT and forgetting are computed on -R, so BWT < 0 still means forgetting" if lower_is_better else ""),
        "higher_is_better": not lower_is_better,
        "general": general,
        "fluency": list(fluency or []),  # ROME's generation entropy per row (sequences with edit tasks that set it)
        "abilities": ability_scores,  # {suite: {score: [per row]}}: the eval.suites
        "abilities_delta": ability_deltas,  # the same, minus row 0 (the base model)
        "timing": timing,
        "train": train_stats,
        "resources": resource_summary(train_stats),
        "versions": package_versions(),
        "git": git_state(),
        "invocations": list(invocations or []),
        "config": config,
    }
