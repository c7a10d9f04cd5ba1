"""What a run directory remembers between invocations, so a rerun continues where it stopped.

``state.json`` is rewritten atomically after each task's checkpoint is complete, so after a
kill it names only tasks whose checkpoints exist; a half-written checkpoint folder (still
named ``*.tmp``) is never trusted. ``state.json`` also stores the settings that decide the
results, and a rerun with different ones is refused instead of mixing two experiments.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cl_runner.config import is_resume_safe
from cl_runner.errors import UserError
from cl_runner.atomic_io import write_dir_atomic, write_json_atomic
from cl_runner.resources import directory_bytes

STATE_FILE = "state.json"
CHECKPOINT_DIR = "checkpoints"
# Raised when what a number in the matrix means changes, so a run is never continued with rows
# scored another way. 2: choices scored with their end-of-turn token, middle truncation,
# token-weighted accumulation.
FORMAT_VERSION = 2


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def result_settings(config: dict) -> dict:
    """The flattened settings that determine a run's results (see config.RESUME_SAFE_KEYS), and the format version."""
    return {"cl_runner_format": FORMAT_VERSION, **{k: v for k, v in flatten(config).items() if not is_resume_safe(k)}}


def changed_settings(before: dict, now: dict) -> list[str]:
    """The keys whose values differ. A key that is unset (null, or an empty list or mapping) is
    the same as one that is absent: a setting added to cl-runner later, off by default (say
    ``rollback: []``), or a config group that sets nothing (``eval.suites: {}``) does not make
    an older run directory another experiment. Nor does a key stored by an older cl-runner that
    has since become resume-safe (``trainer.sharding``)."""
    unset = (None, [], {})
    keys = {k for k in set(before) | set(now) if not is_resume_safe(k)}
    return sorted(k for k in keys if before.get(k) != now.get(k) and not (before.get(k) in unset and now.get(k) in unset))


@dataclass
class Row:
    """One evaluation of every task: a row of the matrix and what came with it."""

    scores: list[float]  # each task's own metric
    task_scores: list[dict]  # every score of every task
    general: float | None  # the general probe
    seconds: float
    report: dict | None = None  # the method's row_report (e.g. task-identification accuracy)
    fluency: float | None = None  # ROME's generation entropy, for sequences that set task_sequence.fluency
    abilities: dict | None = None  # {suite: {score: value}} of the eval.suites (cl_runner/evaluation/suites.py)


@dataclass
class RunState:
    run_dir: Path
    settings: dict
    tasks: list[str]
    acc_matrix: list[list[float]] = field(default_factory=list)
    general: list[float] = field(default_factory=list)
    task_scores: list[list[dict]] = field(default_factory=list)  # every score of every task, per row
    train_stats: list[dict] = field(default_factory=list)
    timing: dict = field(default_factory=lambda: {"train_s": [], "eval_s": []})
    data: dict = field(default_factory=dict)  # task name -> {"train": hash, "test": hash} (Task.fingerprint)
    invocations: list[dict] = field(default_factory=list)  # provenance.invocation_record() of each invocation
    method_reports: list = field(default_factory=list)  # the method's row_report per row (None where it has none)
    fluency: list = field(default_factory=list)  # per row, for sequences that measure it
    abilities: list = field(default_factory=list)  # per row: {suite: {score: value}} (None where no suite ran)
    writer: bool = field(default=True, repr=False)  # False on data-parallel ranks other than 0: they keep the state, rank 0 writes it

    @property
    def tasks_completed(self) -> int:
        return max(0, len(self.acc_matrix) - 1)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / CHECKPOINT_DIR

    def checkpoint_dir(self, task_index: int) -> Path:
        return self.checkpoint_root / f"task_{task_index + 1:02d}_{self.tasks[task_index]}"

    def completed_checkpoints(self) -> list[Path]:
        return [self.checkpoint_dir(t) for t in range(self.tasks_completed)]

    @classmethod
    def open(cls, run_dir: Path, settings: dict, tasks: list[str], data: dict, may_change: tuple[str, ...] = ()) -> RunState:
        """Load the state of ``run_dir`` or start a new one; refuse a run with other settings (but those under ``may_change``) or other data."""
        path = run_dir / STATE_FILE
        if not path.exists():
            return cls(run_dir, settings, tasks, data=data)
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is corrupt ({exc.msg}); delete the run directory to start over") from exc
        if saved["settings"].get("cl_runner_format") != FORMAT_VERSION:
            raise UserError(
                f"run directory {run_dir} was written by another version of cl-runner, which scores tasks differently; "
                "use another directory (hydra.run.dir=...) or delete this one"
            )
        changed = [k for k in changed_settings(saved["settings"], settings) if not k.startswith(may_change)]
        if changed:
            detail = ", ".join(f"{k}: {saved['settings'].get(k)!r} -> {settings.get(k)!r}" for k in changed[:3])
            raise UserError(
                f"run directory {run_dir} holds a run with other settings ({detail}); "
                "use another directory (hydra.run.dir=...) or delete this one"
            )
        _refuse_other_data(run_dir, saved.get("data", {}), data)
        state = cls(
            run_dir, settings, tasks, saved["acc_matrix"], saved["general"], saved["task_scores"], saved["train_stats"], saved["timing"],
            data, saved.get("invocations", []), saved.get("method_reports", [None] * len(saved["acc_matrix"])),
            saved.get("fluency", []), saved.get("abilities", [None] * len(saved["acc_matrix"])),
        )
        missing = [str(p) for p in state.completed_checkpoints() if not p.is_dir()]
        finished = state.tasks_completed == len(tasks) and (run_dir / "results.json").exists()
        if missing and not finished:  # a finished run needs no checkpoint (users delete them to save disk) unless it is re-scored
            raise UserError(f"{path} lists checkpoints that are missing ({missing[0]}); delete the run directory to start over")
        return state

    def record_invocation(self, record: dict) -> None:
        """Remember this invocation; it reaches state.json with the first row it completes."""
        self.invocations.append(record)

    def save(self) -> None:
        if not self.writer:
            return
        data = asdict(self)
        data.pop("writer")
        data["run_dir"] = str(self.run_dir)
        write_json_atomic(self.run_dir / STATE_FILE, data)

    def record_row(self, row: Row) -> None:
        self.acc_matrix.append(row.scores)
        self.task_scores.append(row.task_scores)
        if row.general is not None:
            self.general.append(row.general)
        self.timing["eval_s"].append(row.seconds)
        self.method_reports.append(row.report)
        if row.fluency is not None:
            self.fluency.append(row.fluency)
        self.abilities.append(row.abilities)

    def commit_task(self, task_index: int, write_checkpoint, row: Row, stats: dict) -> None:
        """Write task ``task_index``'s checkpoint, then record its row: a kill in between leaves no trace."""
        checkpoint_bytes = self._write_checkpoint(task_index, write_checkpoint) if self.writer else None
        self.train_stats.append({**stats, "checkpoint_bytes": checkpoint_bytes})
        self.timing["train_s"].append(stats["seconds"])
        self.record_row(row)
        self.save()

    def _write_checkpoint(self, task_index: int, write_checkpoint) -> int:
        final = self.checkpoint_dir(task_index)
        for stale in final.parent.glob(final.name + ".*.tmp"):  # left by a run killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        # replace=True: a folder already there was left by a run killed after the rename but
        # before state.json was updated, so nothing trusts it.
        write_dir_atomic(final, write_checkpoint, replace=True)
        return directory_bytes(final)


def _refuse_other_data(run_dir: Path, saved: dict, current: dict) -> None:
    for task, splits in current.items():
        for split, digest in splits.items():
            before = saved.get(task, {}).get(split)
            if before is not None and before != digest:
                raise UserError(
                    f"task '{task}': its {split} data differs from what run directory {run_dir} was trained and scored on "
                    "(a data file was edited, or a relative path now resolves elsewhere); restore the data, "
                    "or use another directory (hydra.run.dir=...)"
                )
