"""SeqFT: full fine-tuning of every weight, task after task."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch

from cl_runner.methods.base import ContinualMethod

WEIGHTS_FILE = "model.safetensors"


class SeqFT(ContinualMethod):
    def setup(self, model):
        model.requires_grad_(True)
        return model

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        # save_model handles tied weights (embedding / lm_head), which save_file refuses.
        safetensors.torch.save_model(model, str(directory / WEIGHTS_FILE))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        device = next(model.parameters()).device
        safetensors.torch.load_model(model, str(directories[-1] / WEIGHTS_FILE), device=str(device))
