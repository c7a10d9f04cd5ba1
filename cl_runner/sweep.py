"""Multirun jobs that fail without sinking the sweep.

Inside a sweep (``cl-runner -m ...``) each job's failure, a user error or a crash, is
recorded instead of raised: one ``cl-runner: error: job <dir>: <reason>`` line goes to stderr
(the runner has already written the reason to the job's ``error.txt``) and the next job
starts. When the sweep is over the CLI prints one summary line and exits with status 1
(:func:`failure_summary`). Hydra's basic launcher runs the jobs in this process; other
launchers (SLURM, submitit's local executor) run them elsewhere, so each job also writes its
outcome to ``<sweep dir>/.cl-runner/outcomes/`` and :class:`OutcomeCollector` (a Hydra
callback, in the sweep's own process) reads back those of this sweep when it ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cl_runner.config import is_resume_safe
from cl_runner.error_file import debug_enabled
from cl_runner.errors import one_line


@dataclass
class JobOutcome:
    run_dir: Path
    error: str | None  # the one-line reason; None when the job succeeded


OUTCOMES: list[JobOutcome] = []


def run_job(run: Callable[[], object], run_dir: Path, sweep_dir: Path | None = None) -> None:
    """Run one sweep job; record its outcome and never raise (except on Ctrl-C, which ends the sweep).

    A data-parallel job (several ranks) is the exception: a rank that failed raises, so that
    torchrun or srun (``--kill-on-bad-exit``) stop the others instead of leaving them waiting
    in a collective. Only rank 0 files the outcome.
    """
    failure = None
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - one bad job must not end the other jobs of the sweep
        failure = exc
        reason = one_line(exc)
        if debug_enabled():
            traceback.print_exception(exc, file=sys.stderr)
        print(f"cl-runner: error: job {run_dir}: {reason}", file=sys.stderr)
        outcome = JobOutcome(run_dir, reason)
    else:
        outcome = JobOutcome(run_dir, None)
    OUTCOMES.append(outcome)
    if sweep_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        _write_outcome(Path(sweep_dir), outcome)
    if failure is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise failure


# Set by the sweep's own process: its jobs file their outcomes under this id, so two sweeps
# sharing a sweep dir (or late jobs of an earlier one) never count each other's jobs.
SWEEP_ID_ENV = "CL_RUNNER_SWEEP_ID"


def _outcome_dir(sweep_dir: Path, sweep_id: str | None = None) -> Path:
    return sweep_dir / ".cl-runner" / "outcomes" / (sweep_id or os.environ.get(SWEEP_ID_ENV) or "unnamed")


def _write_outcome(sweep_dir: Path, outcome: JobOutcome) -> None:
    from cl_runner.atomic_io import write_json_atomic

    name = hashlib.sha256(str(outcome.run_dir).encode()).hexdigest()[:16] + ".json"
    write_json_atomic(_outcome_dir(sweep_dir) / name, {"run_dir": str(outcome.run_dir), "error": outcome.error, "time": time.time()})


def collect_outcomes(sweep_dir: Path, sweep_id: str) -> list[JobOutcome]:
    """The outcomes the jobs of sweep ``sweep_id`` wrote under ``sweep_dir`` (one per run directory)."""
    folder = _outcome_dir(Path(sweep_dir), sweep_id)
    records = [json.loads(p.read_text()) for p in folder.glob("*.json")] if folder.is_dir() else []
    return [JobOutcome(Path(r["run_dir"]), r["error"]) for r in records]


class OutcomeCollector:
    """Hydra callback (conf/hydra/default.yaml): after a sweep, the outcomes of its jobs, wherever they ran."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_id = os.environ.get(SWEEP_ID_ENV)
        if not sweep_id:
            return  # not started through cl-runner's main(): only the in-process outcomes are known
        written = {o.run_dir: o for o in collect_outcomes(Path(config.hydra.sweep.dir), sweep_id)}
        in_process = {o.run_dir for o in OUTCOMES}
        OUTCOMES.extend(o for run_dir, o in written.items() if run_dir not in in_process)

    def __getattr__(self, name):  # Hydra calls every hook a callback may have; the others do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def failure_summary() -> str | None:
    """One line naming the failed jobs of this sweep, or None when every job succeeded."""
    failed = [o for o in OUTCOMES if o.error is not None]
    if not failed:
        return None
    return f"cl-runner: {len(failed)} of {len(OUTCOMES)} jobs failed: " + ", ".join(str(o.run_dir) for o in failed)


# Set by the sweep's own process, read by each job's W&B logger (SLURM jobs inherit it too).
SWEEP_GROUP_ENV = "CL_RUNNER_SWEEP_GROUP"
WANDB_GROUP_LIMIT = 128  # characters W&B accepts in a group name


def sweep_group(argv: list[str]) -> str | None:
    """The W&B group of a sweep's runs: its command-line overrides (less the launcher's and those
    that cannot change results), so rerunning the same sweep puts its runs in the same group."""
    if not any(a in ("-m", "--multirun") for a in argv):
        return None
    overrides = sorted(a for a in argv if "=" in a and not a.startswith(("hydra", "-"))
                       and not is_resume_safe(a.split("=", 1)[0].lstrip("+~")))
    name = "sweep: " + (" ".join(overrides) or "defaults")
    if len(name) > WANDB_GROUP_LIMIT:  # cut, with a digest of the whole so two long sweeps stay apart
        name = name[: WANDB_GROUP_LIMIT - 10] + "… " + hashlib.sha256(name.encode()).hexdigest()[:8]
    return name
