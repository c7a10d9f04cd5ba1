"""One process per run directory.

A double submission, or a requeued SLURM job whose first copy still runs, would otherwise
interleave two trainings in one ``state.json``. The runner holds ``run.lock`` for as long as
it works on a run directory: an exclusive ``flock`` on the file, whose content names the
owner (host, pid, start time) for the error message. The operating system drops a flock
when its process dies, however it dies (SIGKILL, OOM killer, node reboot), so a lock left by
a dead process is simply taken over; the file itself stays, emptied on a clean exit.

Where the file system has no flock (some network mounts), the owner recorded in the file
decides instead: a lock whose process is gone from this host is taken over, and a lock held
from another host is respected until its file is deleted by hand.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from cl_runner.errors import RunDirectoryBusy

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(owner: dict | None) -> str:
    if not owner:
        return "an unknown process"
    return f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


class RunLock:
    """``with RunLock(run_dir):`` the calling process is the only one working in ``run_dir``."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None

    def _read_owner(self) -> dict | None:
        try:
            text = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
            return json.loads(text) if text else None
        except (OSError, json.JSONDecodeError):
            return {"host": "?", "pid": "?", "since": "?"}

    def _busy(self, owner: dict | None) -> RunDirectoryBusy:
        return RunDirectoryBusy(
            f"run directory {self.run_dir} is in use by another cl-runner ({_describe(owner)}); "
            f"wait for it to finish or stop it (a lock left by a dead process is taken over: {self.path})"
        )

    def _check_owner_without_flock(self, owner: dict | None) -> None:
        if not owner:
            return
        if owner.get("host") != socket.gethostname():
            raise RunDirectoryBusy(
                f"run directory {self.run_dir} is locked by {_describe(owner)} and this file system has no flock "
                f"to tell whether it still runs; if it does not, delete {self.path}"
            )
        if isinstance(owner.get("pid"), int) and owner["pid"] != os.getpid() and _process_alive(owner["pid"]):
            raise self._busy(owner)

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise self._busy(self._read_owner()) from None
            except OSError as exc:
                if exc.errno not in NO_FLOCK_ERRNOS:
                    raise
                self._check_owner_without_flock(self._read_owner())
            previous = self._read_owner()
            if previous:  # a clean exit empties the file: this owner died while running
                log.warning("Taking over %s from %s, which is no longer running", self.path, _describe(previous))
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(_owner_record()).encode(), 0)
            os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise

    def release(self) -> None:
        if self.fd is None:
            return
        # Emptied, not deleted: deleting would let a process that opened the old file lock it
        # while a third one locks a new file under the same name.
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
