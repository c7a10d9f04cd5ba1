"""Experiment loggers. Local files are always written by the runner; these only mirror them.

Every record a logger receives carries ``step``: the line number of the same record in the
run's ``train_log.jsonl``. That file only grows, so the steps keep increasing across a kill
and a resume, and a W&B row can be matched with its line.

A logger failure never kills a run: the first error is reported as one warning and the
logger switches itself off, so the local results are still written.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
from pathlib import Path

from cl_runner.atomic_io import write_json_atomic
from cl_runner.errors import UserError
from cl_runner.sweep import SWEEP_GROUP_ENV

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
WANDB_RUN_FILE = "wandb_run.json"  # the W&B run id of this run directory, reused on every resume


class NullLogger:
    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        pass

    def log_step(self, record: dict, task_name: str, step: int) -> None:
        pass

    def log_evaluation(self, row: int, task_names: list[str], scores: list[float], general: float | None, task_scores: list[dict] | None, step: int, extra: dict | None = None) -> None:
        pass

    def log_results(self, results: dict, heatmap: Path | None, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id stored in ``run_dir``; a new one is drawn and stored on the first call."""
    path = run_dir / WANDB_RUN_FILE
    if path.exists():
        try:
            return json.loads(path.read_text())["id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s is unreadable; starting a new W&B run", path)
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's own id format
    # Stored before wandb.init: a run killed during init still resumes under this id.
    write_json_atomic(path, {"id": run_id})
    return run_id


class WandbLogger:
    """Weights & Biases; ``mode: offline`` needs no account (``wandb sync`` uploads later).

    One run directory is one W&B run: its id is kept in ``wandb_run.json`` and every
    invocation resumes it (``resume="allow"``), logging at steps that continue where the
    last invocation stopped.
    """

    def __init__(self, project: str = "cl-runner", mode: str = "offline", entity: str | None = None, tags: list | None = None, group: str | None = None, init_timeout: float = 90):
        if mode not in WANDB_MODES:
            raise UserError(f"logger.mode '{mode}' is not one of {list(WANDB_MODES)}")
        if not isinstance(project, str) or not project:
            raise UserError(f"logger.project must be a non-empty name, got {project!r}")
        if not isinstance(init_timeout, (int, float)) or init_timeout <= 0:
            raise UserError(f"logger.init_timeout must be a positive number of seconds, got {init_timeout!r}")
        self.project, self.mode, self.entity = project, mode, entity
        self.tags, self.group = list(tags or []), group
        self.init_timeout = float(init_timeout)
        self.run = None

    def _guard(self, action: str, fn) -> None:
        if self.run is None and action != "start":
            return  # switched off (or never started): the failure was already reported
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - W&B must never kill a run
            log.warning("W&B %s failed (%s: %s); continuing with local results only", action, type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            self._abandon()

    def _abandon(self) -> None:
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1, quiet=True)
            except Exception:  # noqa: BLE001 - already failing; the warning above is the one report
                pass

    def start(self, run_dir: Path, run_name: str, config: dict) -> None:
        def _start():
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.run = wandb.init(
                project=self.project, entity=self.entity, mode=self.mode, dir=str(run_dir), name=run_name,
                config=config, tags=self.tags, group=self.group or os.environ.get(SWEEP_GROUP_ENV), reinit="finish_previous",
                id=wandb_run_id(run_dir), resume="allow", settings=wandb.Settings(init_timeout=self.init_timeout),
            )

        self._guard("start", _start)

    def log_step(self, record: dict, task_name: str, step: int) -> None:
        data = {f"train/{k}": v for k, v in record.items() if k != "step"}
        data.update({"train/task": task_name, "train/task_step": record.get("step")})
        self._guard("log", lambda: self.run.log(data, step=step))

    def log_evaluation(self, row: int, task_names: list[str], scores: list[float], general: float | None, task_scores: list[dict] | None, step: int, extra: dict | None = None) -> None:
        data = {f"eval/{name}": score for name, score in zip(task_names, scores)}
        for name, all_scores in zip(task_names, task_scores or []):
            data.update({f"eval/{name}/{metric}": value for metric, value in all_scores.items()})  # acc and acc_norm
        data["eval/tasks_learnt"] = row
        if general is not None:
            data["eval/general_probe"] = general
        data.update({f"eval/{name}": value for name, value in (extra or {}).items() if value is not None})  # fluency
        self._guard("log", lambda: self.run.log(data, step=step))

    def log_results(self, results: dict, heatmap: Path | None, step: int) -> None:
        def _log():
            import wandb

            tasks = results["tasks"]
            table = wandb.Table(columns=["after", *tasks], data=[[("base" if i == 0 else tasks[i - 1]), *row] for i, row in enumerate(results["acc_matrix"])])
            payload = {"acc_matrix": table}
            if heatmap is not None and heatmap.exists():
                payload["acc_matrix_heatmap"] = wandb.Image(str(heatmap))
            self.run.log(payload, step=step)
            for key, value in {**results["metrics"], **results["resources"]}.items():
                if value is not None and not isinstance(value, list):
                    self.run.summary[key] = value

        self._guard("log results", _log)

    def finish(self, exit_code: int = 0) -> None:
        run = self.run
        self._guard("finish", lambda: self.run.finish(exit_code=exit_code))
        self.run = None
        if run is not None and self.mode == "offline":
            # Plain `wandb sync` of several folders with one id may keep only one of them.
            log.info("W&B offline run %s; upload all of its invocations as one run with: wandb sync --id %s %s/offline-run-*", run.id, run.id, Path(run.dir).parent.parent)
