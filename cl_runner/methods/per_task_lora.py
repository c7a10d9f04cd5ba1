"""PerTaskLoRA: a fresh LoRA adapter per task on a frozen base; each task is evaluated with its own.

Tasks not learnt yet are evaluated on the base model (adapters disabled), so this method's
forward transfer is zero by construction and its forgetting is zero: it needs the task id at
inference, which is what it trades for that.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from peft import get_peft_model

from cl_runner.methods.base import ContinualMethod
from cl_runner.peft_utils import load_adapter, lora_config, save_adapter


def adapter_name(task_index: int) -> str:
    return f"task_{task_index}"


def adapter_file(task_index: int) -> str:
    return f"adapter_{adapter_name(task_index)}.safetensors"


class PerTaskLoRA(ContinualMethod):
    def __init__(self, lora: dict):
        lora_config(lora)  # a bad setting fails now, before the model is loaded
        self.lora = lora
        self.current = 0

    def setup(self, model):
        return get_peft_model(model, lora_config(self.lora), adapter_name=adapter_name(0))

    def _ensure_adapter(self, model, task_index: int) -> None:
        if adapter_name(task_index) not in model.peft_config:
            model.add_adapter(adapter_name(task_index), lora_config(self.lora))

    def before_task(self, model, task_index: int, task) -> None:
        self._ensure_adapter(model, task_index)
        model.set_adapter(adapter_name(task_index))  # only the active adapter is trainable
        self.current = task_index

    @contextlib.contextmanager
    def eval_context(self, model, tasks_learnt: int, task_index: int):
        if task_index >= tasks_learnt:
            with model.disable_adapter():
                yield
            return
        model.set_adapter(adapter_name(task_index))
        try:
            yield
        finally:
            model.set_adapter(adapter_name(self.current))

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        save_adapter(model, directory / adapter_file(task_index), adapter_name(task_index))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        for task_index, directory in enumerate(directories):
            self._ensure_adapter(model, task_index)
            load_adapter(model, directory / adapter_file(task_index), adapter_name(task_index))
        self.current = len(directories) - 1
        model.set_adapter(adapter_name(self.current))
