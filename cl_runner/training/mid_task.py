"""Mid-task checkpoints: a killed or preempted job resumes inside the task it was training.

Every ``trainer.checkpoint_every`` optimizer steps the training loop writes (atomically, one
file) what the rest of the task depends on: the trainable weights (the fp32 masters), the
optimizer, learning-rate schedule and grad-scaler states, the step reached, the tokens seen,
and the random states (Python's, which draws replayed examples, and torch's, which draws
dropout masks). The data order needs no saving: it is drawn from the task's seed at the start.
A resumed task therefore continues with the very numbers an uninterrupted one would have seen,
and the run's results are the same on CPU. The file is read with ``weights_only=True`` and
removed once the task's own checkpoint is committed.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cl_runner.atomic_io import write_file_atomic
from cl_runner.training.sharding import copy_into, gather_full, is_sharded, shard_optimizer_state

log = logging.getLogger(__name__)


@dataclass
class MidTaskCheckpoint:
    path: Path
    task_index: int
    every: int | None  # optimizer steps between saves; None: never save (a saved file is still resumed)
    writer: bool = True  # under data parallelism only rank 0 writes; every rank reads the file on resume

    def due(self, step: int, total_steps: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < total_steps  # the last step ends the task anyway

    def save(self, step: int, tokens: int, seconds: float, masters, optimizer, schedule, scaler, rng: random.Random) -> None:
        """Called on every rank; only the writer writes. Sharded weights and moments are gathered one
        tensor at a time onto the writer's CPU (the other ranks take part and keep nothing)."""
        sharded = any(is_sharded(p) for p in masters.parameters)
        if not self.writer and not sharded:
            return
        parameters = [gather_full(p.detach(), self.writer, to_cpu=True) for p in masters.parameters]
        optimizer_state = gather_full(optimizer.state_dict(), self.writer, to_cpu=True)
        if not self.writer:
            return
        state = {
            "task_index": self.task_index,
            "step": step,
            "tokens": tokens,
            "seconds": seconds,
            # Gathered shards are fresh tensors; on CPU an unsharded .cpu() is the live weight itself: copy those only.
            "parameters": parameters if sharded else [p.clone() for p in parameters],
            "optimizer": optimizer_state,
            "schedule": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "python_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }
        write_file_atomic(self.path, lambda tmp: _save_synced(state, tmp))

    def load(self) -> dict | None:
        """The saved state of this task, or None (no file, or one left by another task)."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu", mmap=True)  # every rank reads it: mapped, not copied
        except Exception as exc:  # noqa: BLE001 - e.g. a file cut short by a crashed node: lose the steps, not the run
            log.warning("%s cannot be read (%s): the task starts over", self.path, exc)
            return None
        return state if state["task_index"] == self.task_index else None

    def restore(self, state: dict, masters, optimizer, schedule, scaler, rng: random.Random) -> tuple[int, int, float]:
        """Put the saved state back; returns (steps done, tokens seen, the perf_counter the task started at)."""
        saved = state["parameters"]
        if [tuple(p.shape) for p in saved] != [tuple(p.shape) for p in masters.parameters]:
            raise RuntimeError(f"{self.path} holds other trainable parameters than this task trains; delete it to restart the task")
        with torch.no_grad():
            for master, value in zip(masters.parameters, saved):
                copy_into(master, value)
        masters.master_to_model()
        optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer))
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        python_rng = state["python_rng"]
        rng.setstate((python_rng[0], tuple(python_rng[1]), python_rng[2]))
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return state["step"], state["tokens"], time.perf_counter() - state["seconds"]

    def clear(self) -> None:
        if not self.writer:
            return
        self.path.unlink(missing_ok=True)
        for partial in self.path.parent.glob(self.path.name + ".*.tmp*"):  # left by a kill during a save
            partial.unlink(missing_ok=True)


def _save_synced(state: dict, path: Path) -> None:
    """torch.save, flushed to disk before the rename makes it the checkpoint (a node crash must not leave it empty)."""
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
