"""The ``cl-runner`` command: a thin Hydra entry point around :func:`cl_runner.runner.run`.

Bad input ends with one ``cl-runner: error: ...`` line and exit status 2. Set
``CL_RUNNER_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

from cl_runner.config import CONFIG_DIR  # also registers the or_default resolver
from cl_runner.errors import UserError

def _quiet_libraries() -> None:
    # Library chatter (deprecation notices, HTTP retries) buries the per-task summary lines.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "peft", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from cl_runner.runner import run

    _quiet_libraries()
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except UserError as exc:
        if os.environ.get("CL_RUNNER_DEBUG"):
            raise
        print(f"cl-runner: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
