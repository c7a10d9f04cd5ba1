"""Figures written next to results.json."""

from __future__ import annotations

from pathlib import Path

from cl_runner.atomic_io import write_file_atomic


def plot_heatmap(task_names, acc_matrix, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["base"] + [f"after {name}" for name in task_names]
    fig, ax = plt.subplots(figsize=(1.4 * len(task_names) + 2.5, 0.6 * len(rows) + 1.5))
    image = ax.imshow(acc_matrix, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(task_names)), labels=task_names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    for r, row in enumerate(acc_matrix):
        for c, value in enumerate(row):
            ax.text(c, r, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black", fontsize=9)
    ax.set_xlabel("evaluated task")
    ax.set_title(title or "accuracy matrix R[t][i]")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    write_file_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
