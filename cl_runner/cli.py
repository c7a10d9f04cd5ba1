"""The ``cl-runner`` command: a thin Hydra entry point around :func:`cl_runner.runner.run`.

A single run that meets bad input ends with one ``cl-runner: error: ...`` line and exit
status 2, wherever the error was raised (a model loader or replay buffer that Hydra
instantiates included). In a sweep (``-m``) a failing job is recorded and the others run
(:mod:`cl_runner.sweep`); the sweep then exits with status 1. Set ``CL_RUNNER_DEBUG=1`` to
see full tracebacks instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cl_runner import sweep
from cl_runner.config import CONFIG_DIR  # also registers the or_default resolver
from cl_runner.error_file import debug_enabled
from cl_runner.provenance import COMMAND_ENV
from cl_runner.errors import find_user_error, one_line

USER_ERROR_STATUS = 2
FAILED_JOBS_STATUS = 1


def _quiet_libraries() -> None:
    # Library chatter (deprecation notices, HTTP retries) buries the per-task summary lines.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "peft", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _write_hydra_snapshot(cfg: DictConfig, run_dir: Path) -> None:
    """Hydra's ``.hydra/`` record of the run (config, Hydra's own config, the overrides), written atomically."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from cl_runner.atomic_io import write_file_atomic

    hydra_cfg = HydraConfig.get()
    files = {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
        "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
    }
    for name, text in files.items():
        write_file_atomic(run_dir / ".hydra" / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))


def _run_single(run: Callable[[], object]) -> None:
    try:
        run()
    except Exception as exc:
        if find_user_error(exc) is None:
            raise  # a bug, or the machine failing: Hydra prints the traceback
        if debug_enabled():
            traceback.print_exception(exc, file=sys.stderr)
        print(f"cl-runner: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl_runner.runner import run

    _quiet_libraries()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)

    def run_this() -> None:
        run(cfg, run_dir, snapshot=lambda directory: _write_hydra_snapshot(cfg, directory))

    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep.run_job(run_this, run_dir, Path(hydra_cfg.sweep.dir))
    else:
        _run_single(run_this)


def main() -> None:
    # A W&B service inherited from a parent process (a notebook, a launcher, a test runner)
    # outlives our run: after a kill it still holds the run id, and the resumed run is refused.
    os.environ.pop("WANDB_SERVICE", None)
    group = sweep.sweep_group(sys.argv[1:])
    if group:
        os.environ.setdefault(sweep.SWEEP_GROUP_ENV, group)
        os.environ[sweep.SWEEP_ID_ENV] = uuid.uuid4().hex  # this sweep's jobs, wherever they run, file outcomes under it
    # Jobs a launcher runs elsewhere see its own argv (submitit's): record the command as typed.
    os.environ.setdefault(COMMAND_ENV, json.dumps(["cl-runner", *sys.argv[1:]]))
    _hydra_main()
    summary = sweep.failure_summary()
    if summary:
        print(summary, file=sys.stderr)
        sys.exit(FAILED_JOBS_STATUS)


if __name__ == "__main__":
    main()
