"""Incremental LoRA and O-LoRA (Wang et al., EMNLP Findings 2023): a new LoRA per task, all summed.

Before task t a fresh LoRA (A random, B zero) joins the earlier ones, which are frozen; the
model's forward adds every adapter's delta, at training and at inference alike (no task id).
``inc_lora`` stops there. O-LoRA adds two terms to the loss of task t:

    lambda_1 * sum over layers and earlier tasks s of sum_ij |A_s A_t^T|_ij      (orthogonality)
    lambda_2 * sum over layers of (||A_t||_2 + ||B_t||_2)                         (L2 of the new LoRA)

so the new task's update lies in a subspace orthogonal to the earlier tasks' LoRA subspaces
(the A matrices span the input directions each adapter reads). Both terms are logged apart
(``orthogonal_loss``, ``l2_loss`` in train_log.jsonl and W&B, unweighted): with many layers
the orthogonality sum reaches hundreds or thousands while the task loss is below ten
(O-LoRA issue #33), which is what ``orthogonal_weight`` is tuned against.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.peft_utils import load_adapter, lora_layers, save_adapter, sum_adapters


def adapter_name(task_index: int) -> str:
    return f"task_{task_index}"


def orthogonality(layers: dict, current: int) -> torch.Tensor:
    """O-LoRA's term: the element-wise L1 norm of A_s A_t^T, summed over layers and earlier tasks s < t."""
    terms = [(layer.lora_A[adapter_name(s)].weight @ layer.lora_A[adapter_name(current)].weight.T).abs().sum()
             for layer in layers.values() for s in range(current)]
    if not terms:  # the first task has nothing to be orthogonal to
        return torch.zeros((), device=next(iter(layers.values())).lora_A[adapter_name(current)].weight.device)
    return torch.stack(terms).sum()


def new_adapter_l2(layers: dict, current: int) -> torch.Tensor:
    """O-LoRA's L2 term: the Frobenius norms of the new adapter's A and B, summed over layers."""
    name = adapter_name(current)
    return torch.stack([layer.lora_A[name].weight.norm() + layer.lora_B[name].weight.norm() for layer in layers.values()]).sum()


class IncrementalLoRA(ContinualMethod):
    def __init__(self, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, target_modules: list = ("q_proj", "v_proj"),
                 orthogonal_weight: float = 0.0, l2_weight: float = 0.0):
        if not (isinstance(r, int) and r >= 1):
            raise UserError(f"method.r must be a positive integer, got {r!r}")
        for key, value in (("orthogonal_weight", orthogonal_weight), ("l2_weight", l2_weight)):
            if not isinstance(value, (int, float)) or value < 0:
                raise UserError(f"method.{key} must be a non-negative number, got {value!r}")
        self.config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(target_modules))
        self.orthogonal_weight, self.l2_weight = float(orthogonal_weight), float(l2_weight)
        self.current = 0
        self._terms: dict = {}

    def setup(self, model):
        return get_peft_model(model, self.config, adapter_name=adapter_name(0))

    def _activate(self, model, current: int) -> None:
        """Adapters 0..current all answer (summed); only the current one trains."""
        self.current = current
        for t in range(current + 1):
            if adapter_name(t) not in model.peft_config:
                model.add_adapter(adapter_name(t), self.config)  # B starts at zero: the sum is unchanged
        sum_adapters(model, [adapter_name(t) for t in range(current + 1)])
        for parameter in self.trainable_parameters(model):
            parameter.requires_grad_(True)

    def before_task(self, model, task_index: int, task) -> None:
        self._activate(model, task_index)

    def trainable_parameters(self, model):
        name = adapter_name(self.current)
        return [p for layer in lora_layers(model).values() for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)]

    def extra_loss(self, model, batch, outputs):
        weighted = self.orthogonal_weight > 0 or self.l2_weight > 0
        with contextlib.nullcontext() if weighted else torch.no_grad():  # inc_lora logs the terms without training on them
            layers = lora_layers(model)
            orthogonal, l2 = orthogonality(layers, self.current), new_adapter_l2(layers, self.current)
        self._terms = {"orthogonal_loss": float(orthogonal.detach()), "l2_loss": float(l2.detach())}
        return self.orthogonal_weight * orthogonal + self.l2_weight * l2 if weighted else None

    def step_report(self):
        return dict(self._terms)

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        return model.disable_adapter() if tasks_learnt == 0 else contextlib.nullcontext()

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        save_adapter(model, directory / f"adapter_{adapter_name(task_index)}.safetensors", adapter_name(task_index))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        for t, directory in enumerate(directories):
            if adapter_name(t) not in model.peft_config:
                model.add_adapter(adapter_name(t), self.config)
            load_adapter(model, directory / f"adapter_{adapter_name(t)}.safetensors", adapter_name(t))
        self._activate(model, len(directories) - 1)
