"""Experiment loggers. Local files are always written by the runner; these only mirror them.

A logger failure never kills a run: the first error is reported as a warning and the logger
switches itself off, so the local results are still written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class NullLogger:
    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        pass

    def log_step(self, record: dict, task_name: str) -> None:
        pass

    def log_evaluation(self, row: int, task_names: list[str], scores: list[float], general: float | None, task_scores: list[dict] | None = None) -> None:
        pass

    def log_results(self, results: dict, heatmap: Path | None) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """Weights & Biases; ``mode: offline`` needs no account (``wandb sync`` uploads later)."""

    def __init__(self, project: str = "cl-runner", mode: str = "offline", entity: str | None = None, tags: list | None = None, group: str | None = None):
        self.project, self.mode, self.entity = project, mode, entity
        self.tags, self.group = list(tags or []), group
        self.run = None
        self.global_step = 0

    def _guard(self, action: str, fn, *args, **kwargs):
        if self.run is None and action != "start":
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - W&B must never kill a run
            log.warning("W&B %s failed (%s: %s); continuing with local results only", action, type(exc).__name__, exc)
            self.run = None
            return None

    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        def _start():
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.run = wandb.init(
                project=self.project, entity=self.entity, mode=self.mode, dir=str(run_dir), name=run_name,
                config=config, tags=self.tags, group=self.group, reinit="finish_previous",
            )

        self._guard("start", _start)

    def log_step(self, record: dict, task_name: str) -> None:
        self.global_step += 1
        data = {f"train/{k}": v for k, v in record.items() if k != "step"}
        data.update({"train/task": task_name, "train/global_step": self.global_step})
        self._guard("log", lambda: self.run.log(data))

    def log_evaluation(self, row: int, task_names: list[str], scores: list[float], general: float | None, task_scores: list[dict] | None = None) -> None:
        data = {f"eval/{name}": score for name, score in zip(task_names, scores)}
        for name, all_scores in zip(task_names, task_scores or []):
            data.update({f"eval/{name}/{metric}": value for metric, value in all_scores.items()})  # acc and acc_norm
        data["eval/tasks_learnt"] = row
        if general is not None:
            data["eval/general_probe"] = general
        self._guard("log", lambda: self.run.log(data))

    def log_results(self, results: dict, heatmap: Path | None) -> None:
        def _log():
            import wandb

            tasks = results["tasks"]
            table = wandb.Table(columns=["after", *tasks], data=[[("base" if i == 0 else tasks[i - 1]), *row] for i, row in enumerate(results["acc_matrix"])])
            payload = {"acc_matrix": table}
            if heatmap is not None and heatmap.exists():
                payload["acc_matrix_heatmap"] = wandb.Image(str(heatmap))
            self.run.log(payload)
            for key, value in results["metrics"].items():
                if value is not None and not isinstance(value, list):
                    self.run.summary[key] = value

        self._guard("log results", _log)

    def finish(self) -> None:
        self._guard("finish", lambda: self.run.finish())
        self.run = None
