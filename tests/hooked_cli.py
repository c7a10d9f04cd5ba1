"""The cl-runner CLI with a hook at one logged training step: a process stopped at a known point, not at a time.

    CL_RUNNER_TEST_AT=<task>:<step>   the step (as logged in train_log.jsonl) where the hook fires
    CL_RUNNER_TEST_AT=<task>:eval     or the logging of the row scored after <task> (before it is committed)
    CL_RUNNER_TEST_DO=kill            SIGKILL this process right after that step is logged
    CL_RUNNER_TEST_DO=pause:<marker>:<release>
                                      write <marker>, then wait until <release> exists

Used by the resume and lock tests: ``python tests/hooked_cli.py <cl-runner arguments>``.
"""

import os
import signal
import sys
import time
from pathlib import Path

from cl_runner import runner
from cl_runner.cli import main

TASK, STEP = os.environ["CL_RUNNER_TEST_AT"].rsplit(":", 1)
ACTION = os.environ["CL_RUNNER_TEST_DO"]
logged_step = runner.EventLog.step


logged_evaluation = runner.EventLog.evaluation


def hooked_evaluation(self, tasks_learnt, task_names, row):
    logged_evaluation(self, tasks_learnt, task_names, row)
    if STEP == "eval" and tasks_learnt and task_names[tasks_learnt - 1] == TASK:
        act()


def hooked_step(self, task_name, record):
    logged_step(self, task_name, record)
    if task_name == TASK and STEP != "eval" and record["step"] == int(STEP):
        act()


def act():
    if ACTION == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    _, marker, release = ACTION.split(":", 2)
    Path(marker).write_text(str(os.getpid()))
    deadline = time.time() + 300
    while not Path(release).exists():
        if time.time() > deadline:
            sys.exit("hooked_cli: never released")
        time.sleep(0.05)


runner.EventLog.step = hooked_step
runner.EventLog.evaluation = hooked_evaluation
sys.argv[0] = "cl-runner"
main()
