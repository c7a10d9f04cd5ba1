"""Shared helpers: compose configs like the CLI does, and run the CLI as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cl_runner.config import compose_config  # noqa: F401 - the tests' way to build a config

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each pytest-xdist worker gets one core: two workers on two cores instead of four threads fighting over them.
    # Set before any test, so the CLI subprocesses the tests start inherit it too.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
QUIET = ["trainer.progress_bar=false", "eval.progress_bar=false"]
SMOKE = ["experiment=smoke", *QUIET]
# Data parallelism compared with one process: 32 training examples make 4 optimizer steps of 8 (one
# process at batch 8) or of 4 + 4 (two ranks at batch 4); no dropout, since each rank draws its
# own masks for its own examples.
DATA_PARALLEL = [*SMOKE, "task_sequence.train_size=32", "trainer.max_steps=4", "trainer.num_threads=1", "method.peft.lora_dropout=0.0"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cl_runner", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def train_log(run_dir: Path) -> tuple[list[str], list[float]]:
    """The event kinds in a run's train_log.jsonl, and the loss of each training step."""
    events = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [e["event"] for e in events], [e["loss"] for e in events if e["event"] == "train_step"]


COLOURS = ["red", "green", "blue", "cyan"]


def task_with_inputs(tokenizer, name: str = "colours", words=COLOURS * 2):
    """A small task whose training inputs methods can read (``task.input_batches``), as the runner provides them."""
    from cl_runner.formatting import PromptFormatter
    from cl_runner.tasks import Example, Task
    from cl_runner.training.batching import input_batches

    formatter = PromptFormatter(tokenizer, True, None, 128)
    train = [Example(f"Say the word number {i} ({name}).", word) for i, word in enumerate(words)]
    task = Task(name=name, dataset_path="json", doc_to_text="q", doc_to_target="a", train=train)
    encoded = [formatter.encode_example(e, 0) for e in train]
    task.input_batches = lambda prompts_only=False: input_batches(encoded, 4, "cpu", prompts_only)
    return task, encoded


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer():
    from cl_runner.models import load_model

    return load_model(compose_config(["model=tiny"]).model)
