"""Multirun jobs that fail without sinking the sweep.

Inside a sweep (``cl-runner -m ...``) each job's failure, a user error or a crash, is
recorded instead of raised: the job's run directory gets ``error.txt`` (the one-line reason,
plus the traceback with ``CL_RUNNER_DEBUG=1``), one ``cl-runner: error:`` line goes to
stderr, and the next job starts. When the sweep is over the CLI prints one summary line and
exits with status 1 (:func:`failure_summary`). Hydra's basic launcher runs the jobs in this
process, which is where the outcomes are collected.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cl_runner.atomic_io import write_file_atomic
from cl_runner.errors import RunDirectoryBusy, find_user_error, one_line

ERROR_FILE = "error.txt"


@dataclass
class JobOutcome:
    run_dir: Path
    error: str | None  # the one-line reason; None when the job succeeded


OUTCOMES: list[JobOutcome] = []


def debug_enabled() -> bool:
    return bool(os.environ.get("CL_RUNNER_DEBUG"))


def _write_error_file(run_dir: Path, reason: str, exc: BaseException) -> None:
    text = reason + "\n"
    if debug_enabled():
        text += "\n" + "".join(traceback.format_exception(exc))

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_file_atomic(run_dir / ERROR_FILE, write)


def run_job(run: Callable[[], object], run_dir: Path) -> None:
    """Run one sweep job; record its outcome and never raise (except on Ctrl-C, which ends the sweep)."""
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - one bad job must not end the other jobs of the sweep
        reason = one_line(exc)
        # A busy directory belongs to another live process: its own outcome, not ours, goes there.
        if not isinstance(find_user_error(exc), RunDirectoryBusy):
            _write_error_file(run_dir, reason, exc)
        if debug_enabled():
            traceback.print_exception(exc, file=sys.stderr)
        print(f"cl-runner: error: job {run_dir}: {reason}", file=sys.stderr)
        OUTCOMES.append(JobOutcome(run_dir, reason))
    else:
        OUTCOMES.append(JobOutcome(run_dir, None))


def clear_error_file(run_dir: Path) -> None:
    """A job that starts again forgets its previous failure."""
    (run_dir / ERROR_FILE).unlink(missing_ok=True)


def failure_summary() -> str | None:
    """One line naming the failed jobs of this sweep, or None when every job succeeded."""
    failed = [o for o in OUTCOMES if o.error is not None]
    if not failed:
        return None
    where = ", ".join(str(o.run_dir) for o in failed)
    return f"cl-runner: {len(failed)} of {len(OUTCOMES)} jobs failed (reasons in their {ERROR_FILE}): {where}"
