"""Joint training on every task of the sequence at once: the upper bound continual-learning tables report.

One adapter (the ``peft:`` block, LoRA by default) trains on the union of all tasks' training
examples when the first task comes, for the configured epochs (so every example is seen as
often as in the sequence); later tasks train nothing. Every row of the accuracy matrix after
training is therefore the same model: BWT is 0 by construction and ACC is what training on all
the data at once reaches; FWT means nothing here (the rows before a task already learnt it).
Its training time and cost are reported on the first task, and ``trainer.max_steps`` caps the
one joint run (not each task).
"""

from __future__ import annotations

from pathlib import Path

from cl_runner.methods.base import ContinualMethod
from cl_runner.methods.peft_adapter import PeftAdapter

NOTHING_TRAINED = {"steps": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "final_loss": None}


class Multitask(ContinualMethod):
    def __init__(self, peft: dict):
        self.adapter = PeftAdapter(peft, mode="sequential")

    def setup(self, model):
        return self.adapter.setup(model)

    def before_task(self, model, task_index: int, task) -> None:
        self.adapter.before_task(model, task_index, task)

    def trainable_parameters(self, model):
        return self.adapter.trainable_parameters(model)

    def learn(self, model, task_index: int, task, train) -> dict:
        if task_index > 0:  # learnt with the first task already
            return dict(NOTHING_TRAINED)
        return train("all")

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        return self.adapter.eval_context(model, tasks_learnt, task_index)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        self.adapter.save_checkpoint(model, directory, task_index)

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.adapter.load_checkpoint(model, directories)
