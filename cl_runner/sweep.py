"""Multirun jobs that fail without sinking the sweep.

Inside a sweep (``cl-runner -m ...``) each job's failure, a user error or a crash, is
recorded instead of raised: one ``cl-runner: error: job <dir>: <reason>`` line goes to stderr
(the runner has already written the reason to the job's ``error.txt``) and the next job
starts. When the sweep is over the CLI prints one summary line and exits with status 1
(:func:`failure_summary`). Hydra's basic launcher runs the jobs in this process, which is
where the outcomes are collected.
"""

from __future__ import annotations

import hashlib
import sys
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


def run_job(run: Callable[[], object], run_dir: Path) -> None:
    """Run one sweep job; record its outcome and never raise (except on Ctrl-C, which ends the sweep)."""
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - one bad job must not end the other jobs of the sweep
        reason = one_line(exc)
        if debug_enabled():
            traceback.print_exception(exc, file=sys.stderr)
        print(f"cl-runner: error: job {run_dir}: {reason}", file=sys.stderr)
        OUTCOMES.append(JobOutcome(run_dir, reason))
    else:
        OUTCOMES.append(JobOutcome(run_dir, None))


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
