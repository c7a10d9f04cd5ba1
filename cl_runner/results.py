"""Run files: atomic JSON writes, the results.json record, the accuracy-matrix heatmap."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from cl_runner.metrics import all_metrics

VERSIONED_PACKAGES = ("cl-runner", "torch", "transformers", "peft", "hydra-core", "omegaconf", "datasets", "wandb", "safetensors")


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())

    write_file_atomic(path, write)


def write_dir_atomic(target: Path, write: Callable[[Path], None], replace: bool) -> None:
    """Fill a temporary sibling folder with ``write(tmp)``, then rename it to ``target``.

    ``replace=False`` keeps an existing ``target`` (a concurrent job that finished first won
    the race: its copy is as good); ``replace=True`` swaps it out.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    try:
        write(tmp)
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if replace or not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict | None:
    """Commit and dirty flag of the cl-runner checkout, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


def build_results(task_names, acc_matrix, general, timing, train_stats, config) -> dict:
    return {
        "tasks": list(task_names),
        "acc_matrix": acc_matrix,
        "metrics": all_metrics(acc_matrix, general or None),
        "metric_notes": "row 0 = base model, row t = after task t; BWT and FWT in the GEM form (divide by T-1)",
        "general": general,
        "timing": timing,
        "train": train_stats,
        "versions": package_versions(),
        "git": git_state(),
        "config": config,
    }


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
