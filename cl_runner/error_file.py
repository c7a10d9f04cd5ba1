"""``error.txt``: why the last attempt at a run directory failed, for whoever looks at it later.

Written by the runner while it still holds the directory's lock (so it can never land in a
directory another process has taken over since), removed when the run is tried again. With
``CL_RUNNER_DEBUG=1`` the traceback follows the one-line reason.
"""

from __future__ import annotations

import logging
import os
import traceback
from pathlib import Path

from cl_runner.atomic_io import write_file_atomic
from cl_runner.errors import one_line

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"


def debug_enabled() -> bool:
    return bool(os.environ.get("CL_RUNNER_DEBUG"))


def write_error_file(run_dir: Path, exc: BaseException) -> None:
    text = one_line(exc) + "\n"
    if debug_enabled():
        text += "\n" + "".join(traceback.format_exception(exc))

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    try:
        write_file_atomic(run_dir / ERROR_FILE, write)
    except OSError as write_error:  # a full disk may be why the run failed: report it, do not mask it
        log.warning("could not write %s (%s)", run_dir / ERROR_FILE, write_error)


def clear_error_file(run_dir: Path) -> None:
    """A run that starts again forgets its previous failure."""
    (run_dir / ERROR_FILE).unlink(missing_ok=True)
