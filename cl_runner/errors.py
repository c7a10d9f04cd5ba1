"""User-facing errors: printed as one line by the CLI, never as a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, run directory). The message says what and how to fix it."""


class RunDirectoryBusy(UserError):
    """Another live process owns the run directory (see cl_runner/run_lock.py)."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind ``exc``, however deeply wrapped (Hydra wraps errors raised in instantiated targets).

    Only explicit causes (``raise ... from``) are followed: an error raised while a UserError
    was being handled (a failing cleanup) is a failure of its own, not the user's.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__
    return None


def one_line(exc: BaseException) -> str:
    """The reason for a failure in one line: a UserError's message, else the exception type and its first line."""
    user = find_user_error(exc)
    if user is not None:
        return " ".join(str(user).split())  # a message quoting a multi-line library error stays one line
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
