"""The ``cl-runner`` command: a thin Hydra entry point around :func:`cl_runner.runner.run`.

A single run that meets bad input ends with one ``cl-runner: error: ...`` line and exit
status 2, wherever the error was raised (a model loader or replay buffer that Hydra
instantiates included). In a sweep (``-m``) a failing job is recorded and the others run
(:mod:`cl_runner.sweep`); the sweep then exits with status 1. Set ``CL_RUNNER_DEBUG=1`` to
see full tracebacks instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cl_runner import sweep
from cl_runner.config import CONFIG_DIR  # also registers the or_default resolver
from cl_runner.errors import find_user_error

USER_ERROR_STATUS = 2
FAILED_JOBS_STATUS = 1


def _quiet_libraries() -> None:
    # Library chatter (deprecation notices, HTTP retries) buries the per-task summary lines.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "peft", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _run_single(cfg: DictConfig, run_dir: Path) -> None:
    from cl_runner.runner import run

    try:
        run(cfg, run_dir)
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None or sweep.debug_enabled():
            raise  # a bug: Hydra prints the traceback
        print(f"cl-runner: error: {user_error}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl_runner.runner import run

    _quiet_libraries()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep.run_job(lambda: run(cfg, run_dir), run_dir)
    else:
        _run_single(cfg, run_dir)


def main() -> None:
    _hydra_main()
    summary = sweep.failure_summary()
    if summary:
        print(summary, file=sys.stderr)
        sys.exit(FAILED_JOBS_STATUS)


if __name__ == "__main__":
    main()
