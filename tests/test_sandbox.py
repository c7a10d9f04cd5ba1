"""Model-written code runs in a limited process: what loops, allocates or reaches outside is stopped and scored as a failure."""

from __future__ import annotations

import os
import time

import pytest

from cl_runner.evaluation.sandbox import SandboxLimits, run_program

LIMITS = SandboxLimits(wall_s=4, cpu_s=1, memory_mb=256, file_mb=1)
SOLUTION = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def test_a_correct_solution_passes_and_a_wrong_one_fails():
    assert run_program(SOLUTION + TESTS, LIMITS).outcome == "passed"
    wrong = run_program(SOLUTION.replace("a + b", "a - b") + TESTS, LIMITS)
    assert (wrong.passed, wrong.outcome) == (False, "failed") and "AssertionError" in wrong.detail


def test_code_may_write_in_its_own_folder_which_is_removed_afterwards():
    run = run_program("import os\nopen('notes.txt', 'w').write('x')\nassert open('notes.txt').read() == 'x'\nprint(os.getcwd())\n", LIMITS)
    assert run.passed
    folder = run.detail.strip()  # stdout, as nothing went to stderr
    assert "cl-runner-sandbox-" in folder and not os.path.exists(folder)


@pytest.mark.parametrize("program,outcome", [
    ("while True:\n    pass\n", "cpu_limit"),  # burns CPU: RLIMIT_CPU
    ("import time\ntime.sleep(60)\n", "timeout"),  # waits without CPU: the wall clock
    ("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n", "memory_limit"),
    ("open('big', 'wb').write(b'x' * (8 << 20))\n", "file_limit"),
])
def test_runaway_code_is_stopped_in_time_and_scored_as_failed(program, outcome):
    started = time.perf_counter()
    run = run_program(SOLUTION + program + TESTS, LIMITS)
    assert (run.passed, run.outcome) == (False, outcome)
    assert time.perf_counter() - started < LIMITS.wall_s + 2


@pytest.mark.parametrize("action", [
    "open({outside!r}, 'w').write('escaped')",
    "import pathlib; pathlib.Path({outside!r}).write_text('escaped')",
    "import os; os.system('touch ' + {outside!r})",
    "import subprocess; subprocess.run(['touch', {outside!r}])",
    "import shutil; shutil.copyfile('program.py', {outside!r})",
    "import os; os.rename('program.py', {outside!r})",
    "import ctypes",  # native calls would step around the audit hook
])
def test_writing_outside_its_folder_or_starting_processes_is_refused(action, tmp_path):
    outside = tmp_path / "escaped.txt"
    program = f"try:\n    {action.format(outside=str(outside))}\nexcept Exception as exc:\n    raise SystemExit(str(exc))\n"
    run = run_program(SOLUTION + program, LIMITS)
    assert (run.passed, run.outcome) == (False, "refused"), run.detail
    assert not outside.exists()


def test_the_network_is_refused(tmp_path):
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(1)
    port = server.getsockname()[1]
    run = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hello')\n", LIMITS)
    assert run.outcome == "refused"
    with pytest.raises(TimeoutError):
        server.accept()  # nothing connected
    server.close()
