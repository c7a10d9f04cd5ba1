"""Replay: mixing earlier tasks' examples and general instruction data into each training batch.

``ratio`` is the share of every mixed batch that comes from the replay pool (0.1-0.3 in the
design document): with a batch of B current-task examples, ``round(B * ratio / (1 - ratio))``
replayed examples are added. The buffer keeps a seeded sample of each finished task, so on
resume it is rebuilt exactly from the task data and needs no state of its own.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from cl_runner.errors import UserError
from cl_runner.formatting import TokenizedExample
from cl_runner.tasks import Task, load_task


class NoReplay:
    """Train on the current task's data only."""

    ratio = 0.0  # share of each optimizer step's loss weight carried by replayed examples

    def data_tasks(self, task_dirs: list[str]) -> list[Task]:
        """Tasks outside the sequence whose training data this replay mixes in (fingerprinted with the run)."""
        return []

    def setup(self, encode: Callable[[Task], list[TokenizedExample]], data_tasks: list[Task]) -> None:
        pass

    def add_task(self, task_index: int, examples: Sequence[TokenizedExample]) -> None:
        pass

    def sample(self, batch_size: int, rng: random.Random) -> list[TokenizedExample]:
        return []


class InstructionReplay:
    """Earlier tasks' examples plus general instruction data: ``ratio`` of every batch and of its loss weight."""

    def __init__(self, ratio: float = 0.2, per_task: int = 100, general_task: str | None = "general_instructions", seed: int = 0):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
            raise UserError(f"replay.ratio must be a number in (0, 1), got {ratio!r}")
        if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 0:
            raise UserError(f"replay.per_task must be a non-negative integer, got {per_task!r}")
        self.ratio = ratio
        self.per_task = per_task
        self.general_task = general_task
        self.seed = seed
        self.pool: list[TokenizedExample] = []

    def data_tasks(self, task_dirs: list[str]) -> list[Task]:
        return [load_task(self.general_task, task_dirs)] if self.general_task else []

    def setup(self, encode: Callable[[Task], list[TokenizedExample]], data_tasks: list[Task]) -> None:
        for task in data_tasks:
            self.pool.extend(encode(task))

    def add_task(self, task_index: int, examples: Sequence[TokenizedExample]) -> None:
        rng = random.Random(f"{self.seed}-replay-{task_index}")
        self.pool.extend(rng.sample(list(examples), min(self.per_task, len(examples))))

    def replay_count(self, batch_size: int) -> int:
        if not self.pool:
            return 0
        return min(len(self.pool), max(1, round(batch_size * self.ratio / (1 - self.ratio))))

    def sample(self, batch_size: int, rng: random.Random) -> list[TokenizedExample]:
        return rng.sample(self.pool, self.replay_count(batch_size))
