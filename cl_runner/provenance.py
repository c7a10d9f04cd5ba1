"""What produced a run: package versions and the cl-runner git commit, recorded in results.json."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

VERSIONED_PACKAGES = ("cl-runner", "torch", "transformers", "peft", "hydra-core", "omegaconf", "datasets", "wandb", "safetensors")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state() -> dict | None:
    """Commit and dirty flag of the cl-runner checkout, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(dirty)}


COMMAND_ENV = "CL_RUNNER_COMMAND"  # the command line as typed (cli.main sets it; launchers' jobs inherit it)


def invocation_record(device: str, tasks_completed: int) -> dict:
    """Where and with what one invocation ran: device, thread count and versions change floating-point results."""
    import torch

    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "device": device,
        "num_threads": torch.get_num_threads(),
        "tasks_completed_at_start": tasks_completed,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),  # None outside SLURM; a requeued job keeps its id
        "command": json.loads(os.environ[COMMAND_ENV]) if COMMAND_ENV in os.environ else list(sys.argv),
        "versions": package_versions(),
        "git": git_state(),
    }
