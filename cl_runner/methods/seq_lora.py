"""SeqLoRA: one LoRA adapter trained on task after task (the standard forgetting baseline)."""

from __future__ import annotations

from pathlib import Path

from peft import get_peft_model

from cl_runner.methods.base import ContinualMethod
from cl_runner.peft_utils import load_adapter, lora_config, save_adapter

ADAPTER_FILE = "adapter.safetensors"


class SeqLoRA(ContinualMethod):
    def __init__(self, lora: dict):
        lora_config(lora)  # a bad setting fails now, before the model is loaded
        self.lora = lora

    def setup(self, model):
        return get_peft_model(model, lora_config(self.lora))

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        save_adapter(model, directory / ADAPTER_FILE)

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        load_adapter(model, directories[-1] / ADAPTER_FILE)
