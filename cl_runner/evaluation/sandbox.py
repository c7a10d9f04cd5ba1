"""Running model-written Python in a separate, limited process (for code tasks scored by unit tests).

The program (the model's completion followed by the task's tests) runs in a fresh interpreter
(``python -I``: no user site, no environment-driven imports) whose working directory is a
throw-away folder, removed afterwards. Before the program starts, the child process:

- sets resource limits: CPU seconds, address space (memory), the size of any file it writes,
  and no core dumps; the parent also kills it (its whole process group) at a wall-clock limit;
- installs a Python audit hook (PEP 578, which cannot be removed once added) that refuses
  writing, creating, deleting or renaming anything outside its folder, sockets (so no
  network), starting processes or signalling others, and loading native code (``ctypes``),
  which would step around the hook.

This guards against the accidents model-written code makes (infinite loops, runaway memory,
stray files, ``os.system``), not against code written to escape: that needs an OS sandbox
(a container or a VM), which a user can wrap around the whole run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REFUSED_MARK = "cl-runner sandbox refused:"


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0  # the parent kills the process group after this
    cpu_s: int = 5
    memory_mb: int = 512  # address space, interpreter included (about 30 MB)
    file_mb: int = 16  # the largest file it may write
    output_chars: int = 2000  # stdout/stderr kept in the result


@dataclass(frozen=True)
class ProgramRun:
    passed: bool  # exited with status 0
    outcome: str  # passed | failed | timeout | cpu_limit | memory_limit | file_limit | refused
    detail: str  # the end of stderr (or stdout), for the log


# Runs in the child before the program. argv: the program file, the folder, the limits.
_PRELUDE = r'''
import os, resource, sys
program, folder, cpu_s, memory_mb, file_mb = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
source = open(program, encoding="utf-8").read()
folder = os.path.realpath(folder)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link", "os.symlink",
               "os.truncate", "os.utime", "os.chdir", "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copytree"}
FORBIDDEN = {"socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.sendto", "os.system", "os.exec",
             "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn",
             "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.addaudithook", "os.putenv", "os.unsetenv"}

class SandboxViolation(Exception):
    pass

def inside(path):
    if isinstance(path, int):
        return True  # a file descriptor it already holds
    path = os.fsdecode(os.fspath(path))
    return os.path.realpath(path) == folder or os.path.realpath(path).startswith(folder + os.sep)

def refuse(event, args):
    raise SandboxViolation(f"{MARK} {event}{args!r}")

def hook(event, args):
    if event in FORBIDDEN:
        refuse(event, args)
    if event == "import" and args[0] in ("ctypes", "_ctypes"):
        refuse(event, args[:1])
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
        if writing and path is not None and not inside(path):
            refuse(event, args)
    elif event in PATH_EVENTS:
        for value in args:
            if isinstance(value, (str, bytes, os.PathLike)) and not inside(value):
                refuse(event, args)

MARK = sys.argv[6]
sys.addaudithook(hook)
del hook
sys.argv = [program]
exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
'''


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ProgramRun:
    """Run ``source`` (a whole program: the completion and its tests) in the sandbox; passed means exit status 0."""
    with tempfile.TemporaryDirectory(prefix="cl-runner-sandbox-") as folder:
        program = Path(folder) / "program.py"
        program.write_text(source, encoding="utf-8")
        command = [sys.executable, "-I", "-c", _PRELUDE, str(program), folder, str(limits.cpu_s), str(limits.memory_mb), str(limits.file_mb), REFUSED_MARK]
        process = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True, env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"})
        try:
            stdout, stderr = process.communicate(timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            stdout, stderr = process.communicate()
            return ProgramRun(False, "timeout", f"still running after {limits.wall_s} s")
        finally:
            _kill_group(process)  # anything it left behind in its session
    detail = (stderr or stdout)[-limits.output_chars :]
    return ProgramRun(process.returncode == 0, _outcome(process.returncode, stderr), detail)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _outcome(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "passed"
    if REFUSED_MARK in stderr:
        return "refused"
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL) or "CPU time limit" in stderr:
        return "cpu_limit"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory_limit"
    if "File too large" in stderr or returncode == -signal.SIGXFSZ:
        return "file_limit"
    return "failed"
