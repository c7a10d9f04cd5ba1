"""Figures written next to results.json."""

from __future__ import annotations

from pathlib import Path

from cl_runner.atomic_io import write_file_atomic


def plot_heatmap(task_names, acc_matrix, path: Path, title: str = "", lower_is_better: bool = False) -> Path:
    """Scores in [0, 1] on a fixed scale; others (perplexity) on their own range, the better end bright either way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["base"] + [f"after {name}" for name in task_names]
    fig, ax = plt.subplots(figsize=(1.4 * len(task_names) + 2.5, 0.6 * len(rows) + 1.5))
    values = [v for row in acc_matrix for v in row]
    low, high = (0.0, 1.0) if 0.0 <= min(values) and max(values) <= 1.0 else (min(values), max(values))
    image = ax.imshow(acc_matrix, vmin=low, vmax=high, cmap="viridis_r" if lower_is_better else "viridis")
    ax.set_xticks(range(len(task_names)), labels=task_names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    for r, row in enumerate(acc_matrix):
        for c, value in enumerate(row):
            brightness = (value - low) / ((high - low) or 1.0)
            dark = brightness > 0.4 if lower_is_better else brightness < 0.6
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_xlabel("evaluated task")
    ax.set_title(title or "accuracy matrix R[t][i]")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_abilities(task_names, abilities: dict, headlines: dict, path: Path) -> Path:
    """One panel per general-ability suite: its headline score per row (base model, then after each task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["base"] + [f"after {name}" for name in task_names]
    fig, axes = plt.subplots(1, len(abilities), figsize=((1.0 * len(rows) + 2.5) * len(abilities), 3.6), squeeze=False)
    for ax, (suite, scores) in zip(axes[0], abilities.items()):
        key = headlines.get(suite) or next(iter(scores))
        values = [float("nan") if v is None else v for v in scores[key]]
        ax.plot(range(len(values)), values, marker="o")
        ax.set_xticks(range(len(rows)), labels=rows, rotation=30, ha="right")
        if all(0 <= v <= 1 for v in values if v == v):
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{suite}: {key}", fontsize=10)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_trace(tokens, subject_range, scores, low: float, kind: str, answer: str, path: Path) -> Path:
    """A causal-tracing heatmap: rows are the prompt's tokens (subject tokens starred), columns layers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, last = subject_range
    labels = [f"{t!r}*" if first <= i <= last else repr(t) for i, t in enumerate(tokens)]
    fig, ax = plt.subplots(figsize=(0.22 * scores.shape[1] + 3, 0.35 * len(tokens) + 1.5))
    cmap = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}[kind]
    image = ax.imshow(scores, cmap=cmap, vmin=low, aspect="auto")
    ax.set_yticks(range(len(tokens)), labels=labels)
    ax.set_xlabel(f"layer (restored: {kind}{'' if kind == 'hidden' else ', window of 10'})")
    ax.set_title(f"p({answer.strip()}) with one state restored")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
