"""PeftAdapter: any PEFT method, named by the ``peft:`` block of the method YAML.

``mode: sequential`` trains one adapter through the whole sequence (``seq_lora`` and the PEFT
family baselines). ``mode: per_task`` adds a fresh adapter for each task and scores each task
with its own (``per_task_lora``): it needs the task id at test time, and tasks not learnt yet
are scored on the base model. Row 0 of the matrix is always the base model: adapters are
switched off for it, which matters for methods that change the output before any training
(prompt and prefix tuning, IA3 with non-unit init).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from peft import get_peft_model

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.peft_utils import load_adapter, peft_config, save_adapter

MODES = ("sequential", "per_task")


class PeftAdapter(ContinualMethod):
    def __init__(self, peft: dict, mode: str = "sequential"):
        if mode not in MODES:
            raise UserError(f"method.mode '{mode}' is not one of {list(MODES)}")
        peft_config(peft)  # a bad block fails now, before the model is loaded
        self.peft = peft
        self.mode = mode
        self.current = 0

    def adapter_name(self, task_index: int) -> str:
        return "default" if self.mode == "sequential" else f"task_{task_index}"

    def adapter_file(self, task_index: int) -> str:
        return "adapter.safetensors" if self.mode == "sequential" else f"adapter_{self.adapter_name(task_index)}.safetensors"

    def setup(self, model):
        return get_peft_model(model, peft_config(self.peft), adapter_name=self.adapter_name(0))

    def _activate(self, model, task_index: int) -> None:
        name = self.adapter_name(task_index)
        if name not in model.peft_config:
            model.add_adapter(name, peft_config(self.peft))
        model.set_adapter(name)

    def before_task(self, model, task_index: int, task) -> None:
        self._activate(model, task_index)
        self.current = task_index

    def trainable_parameters(self, model):
        # Only the active adapter: PEFT leaves earlier prompt encoders trainable after set_adapter.
        name = self.adapter_name(self.current)
        return [p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in f".{n}."]

    @contextlib.contextmanager
    def eval_context(self, model, tasks_learnt: int, task_index: int):
        if tasks_learnt == 0 or (self.mode == "per_task" and task_index >= tasks_learnt):
            with model.disable_adapter():
                yield
            return
        if self.mode == "sequential":
            yield
            return
        model.set_adapter(self.adapter_name(task_index))
        try:
            yield
        finally:
            model.set_adapter(self.adapter_name(self.current))

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        save_adapter(model, directory / self.adapter_file(task_index), self.adapter_name(task_index))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        last = len(directories) - 1
        restore = range(last + 1) if self.mode == "per_task" else [last]
        for task_index in restore:
            if self.adapter_name(task_index) not in model.peft_config:
                model.add_adapter(self.adapter_name(task_index), peft_config(self.peft))
            load_adapter(model, directories[task_index] / self.adapter_file(task_index), self.adapter_name(task_index))
        self._activate(model, last)
        self.current = last
