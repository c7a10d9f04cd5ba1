"""OSF: PEFT's Orthogonal Subspace Fine-tuning (Nayak et al. 2025, arXiv:2504.07097) through a sequence.

Before each task every targeted weight is split by SVD into its top ``effective_rank``
directions, which stay frozen, and the rest, which trains; PEFT projects each gradient off the
frozen directions, so the task's update is orthogonal to what the weight encoded most. After
the task its update is merged into the weight, and the next task freezes a larger share:
``effective_ranks[t]`` (a fraction of the smaller weight dimension, the last entry repeating),
as in PEFT's continual-learning example (0.3, 0.5, 0.7). Checkpoints hold the merged targeted
weights, since the base itself changes from task to task.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import safetensors.torch
import torch
from peft import OSFConfig, get_peft_model

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod

WEIGHTS_FILE = "osf_weights.safetensors"


def adapter_name(task_index: int) -> str:
    return f"task_{task_index}"


def osf_layers(model) -> dict[str, torch.nn.Module]:
    """The modules PEFT wrapped with OSF, by name."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "osf_svd_params")}


def reattach_projection(model, name: str) -> None:
    """PEFT hooks the gradient projection onto the trainable factors, then (for bf16/fp16 weights)
    replaces them by fp32 copies that carry no hooks: attach them again to the parameters in use."""
    for layer in osf_layers(model).values():
        layer._detach_hooks()
        layer._attach_hooks(name)


class OrthogonalSubspace(ContinualMethod):
    def __init__(self, target_modules: list, effective_ranks: list = (0.3, 0.5, 0.7)):
        ranks = list(effective_ranks)
        if not ranks or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise UserError(f"method.effective_ranks must list positive fractions (or counts), got {ranks!r}")
        self.target_modules = list(target_modules)
        self.effective_ranks = ranks
        self.current = 0

    def config(self, task_index: int) -> OSFConfig:
        rank = self.effective_ranks[min(task_index, len(self.effective_ranks) - 1)]
        return OSFConfig(task_type="CAUSAL_LM", target_modules=self.target_modules, effective_rank=rank)

    def setup(self, model):
        model = get_peft_model(model, self.config(0), adapter_name=adapter_name(0))
        reattach_projection(model, adapter_name(0))
        return model

    @torch.no_grad()
    def _merge_current(self, model) -> None:
        """Fold the current task's update into the weights; its frozen/trainable split is dropped."""
        name = adapter_name(self.current)
        for layer in osf_layers(model).values():
            layer.get_base_layer().weight += layer.get_delta_weight(name).to(layer.get_base_layer().weight.dtype)
        model.delete_adapter(name)

    def before_task(self, model, task_index: int, task) -> None:
        if task_index == self.current:
            return  # the adapter for this task exists (the first task, or a resume)
        self._merge_current(model)
        model.add_adapter(adapter_name(task_index), self.config(task_index))  # a new SVD of the merged weights
        model.set_adapter(adapter_name(task_index))
        reattach_projection(model, adapter_name(task_index))
        self.current = task_index

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        # Untrained, the adapter adds a zero update computed as a difference of two products:
        # switched off, row 0 is exactly the base model.
        return model.disable_adapter() if tasks_learnt == 0 else contextlib.nullcontext()

    @torch.no_grad()
    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        name = adapter_name(self.current)
        merged = {}
        for module_name, layer in osf_layers(model).items():
            weight = layer.get_base_layer().weight
            merged[module_name] = (weight + layer.get_delta_weight(name).to(weight.dtype)).contiguous().cpu()
        safetensors.torch.save_file(merged, str(directory / WEIGHTS_FILE))

    @torch.no_grad()
    def load_checkpoint(self, model, directories: list[Path]) -> None:
        merged = safetensors.torch.load_file(str(directories[-1] / WEIGHTS_FILE))
        layers = osf_layers(model)
        if set(merged) != set(layers):
            raise UserError(f"{directories[-1] / WEIGHTS_FILE} does not match the model's OSF layers; delete the run directory to start over")
        for module_name, layer in layers.items():
            layer.get_base_layer().weight.copy_(merged[module_name])
        # The fresh task-0 adapter has no update yet, so merging it changes nothing; the next
        # before_task() re-splits the restored weights for its own task.
        self.current = len(directories) - 1
        model.delete_adapter(adapter_name(0))
        model.add_adapter(adapter_name(self.current), self.config(self.current))
        model.set_adapter(adapter_name(self.current))
        reattach_projection(model, adapter_name(self.current))
