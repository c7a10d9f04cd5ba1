"""InfLoRA (Liang & Li, CVPR 2024): a LoRA branch per task whose A is designed, not learnt.

Before task t, every adapted layer (``q_proj`` and ``v_proj``, as in the LLM port) sees the new
task's training inputs; their covariance ``C`` (mean of x x^T over real tokens, with the
earlier branches active) has the span of earlier tasks removed, ``C_hat = (I - M M^T) C``, and
``A_t`` is the top ``r`` left singular vectors of ``C_hat``, projected off ``M`` once more (so
it is orthogonal to the stored basis even where ``C_hat`` has fewer than ``r`` directions),
divided by sqrt(3). ``A_t`` stays frozen and only ``B_t`` (starting at zero) trains, so task
t's update lies outside the input space of earlier tasks. All branches are summed at inference
(no task id). After the task, the basis ``M`` of each layer grows by GPM's energy criterion on
the trained model's input covariance: directions are added until the share of the energy
inside the basis reaches ``eps_t = threshold_start + (threshold_end - threshold_start) * t / T``.
(DualGPM's switch to storing the complement once the basis passes half the dimension saves
memory and does not change the projection; cl-runner stores the basis itself.)
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.peft_utils import load_adapter, lora_layers, save_adapter, sum_adapters

BASIS_FILE = "inflora_basis.safetensors"


def adapter_name(task_index: int) -> str:
    return f"task_{task_index}"


@torch.no_grad()
def input_covariances(model, layers: dict, batches) -> dict[str, torch.Tensor]:
    """Mean of x x^T over the real (unpadded) tokens entering each layer, for the given batches."""
    sums = {name: None for name in layers}
    counts = dict.fromkeys(layers, 0)
    current_mask = {}

    def hook_for(name):
        def hook(module, args):
            x = args[0][current_mask["mask"]].to(torch.float64)  # [tokens, in]
            sums[name] = x.T @ x if sums[name] is None else sums[name] + x.T @ x
            counts[name] += x.shape[0]
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current_mask["mask"] = batch["attention_mask"].bool()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: sums[name] / max(counts[name], 1) for name in layers}


def designed_a(covariance: torch.Tensor, basis: torch.Tensor | None, rank: int) -> torch.Tensor:
    """A_t (rank x in): top left singular vectors of the covariance with the basis' span removed, / sqrt(3)."""
    projector = torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    if basis is not None and basis.shape[1]:
        basis = basis.to(covariance.device, covariance.dtype)
        projector = projector - basis @ basis.T
    U, _, _ = torch.linalg.svd(projector @ covariance)
    return (projector @ U[:, :rank]).T / math.sqrt(3)


def grow_basis(covariance: torch.Tensor, basis: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """GPM: add the covariance's directions outside the basis until the basis holds ``threshold`` of its energy."""
    if basis is None or not basis.shape[1]:
        # First task: the leading directions whose cumulative energy share stays below the threshold.
        U, S, _ = torch.linalg.svd(covariance)
        share = S.square().cumsum(0) / S.square().sum()
        return U[:, : max(int((share < threshold).sum()), 1)]
    basis = basis.to(covariance.device, covariance.dtype)
    total = torch.linalg.svdvals(covariance).square().sum()
    U, S, _ = torch.linalg.svd(covariance - basis @ (basis.T @ covariance))
    energy = S.square()
    inside = 1 - energy.sum() / total  # share already explained by the basis
    added = 0
    while added < len(energy) and inside < threshold:
        inside += energy[added] / total
        added += 1
    return torch.cat([basis, U[:, :added]], dim=1)[:, : covariance.shape[0]]


class InfLoRA(ContinualMethod):
    def __init__(self, num_tasks: int, r: int = 8, lora_alpha: float | None = None, target_modules: list = ("q_proj", "v_proj"),
                 threshold_start: float = 0.95, threshold_end: float = 1.0):
        if not (isinstance(r, int) and r >= 1):
            raise UserError(f"method.r must be a positive integer, got {r!r}")
        if not 0 < threshold_start <= threshold_end <= 1:
            raise UserError(f"method.threshold_start and threshold_end must satisfy 0 < start <= end <= 1, got {threshold_start}, {threshold_end}")
        self.num_tasks = int(num_tasks)
        self.config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=lora_alpha or r, lora_dropout=0.0, target_modules=list(target_modules))
        self.threshold_start, self.threshold_end = threshold_start, threshold_end
        self.bases: dict[str, torch.Tensor] = {}
        self.current = 0

    def threshold(self, task_index: int) -> float:
        return self.threshold_start + (self.threshold_end - self.threshold_start) * task_index / max(self.num_tasks, 1)

    def setup(self, model):
        return get_peft_model(model, self.config, adapter_name=adapter_name(0))

    def _activate_all(self, model, last: int) -> None:
        """Every branch up to ``last`` takes part in the forward pass (summed); only B_last trains."""
        sum_adapters(model, [adapter_name(t) for t in range(last + 1)])
        for layer in lora_layers(model).values():
            layer.lora_B[adapter_name(last)].weight.requires_grad_(True)

    def before_task(self, model, task_index: int, task) -> None:
        if adapter_name(task_index) not in model.peft_config:
            model.add_adapter(adapter_name(task_index), self.config)  # B starts at zero
        self._activate_all(model, task_index)
        self.current = task_index
        layers = lora_layers(model)
        covariances = input_covariances(model, layers, task.input_batches())
        with torch.no_grad():
            for name, layer in layers.items():
                weight = layer.lora_A[adapter_name(task_index)].weight
                weight.copy_(designed_a(covariances[name], self.bases.get(name), weight.shape[0]).to(weight.dtype))

    def trainable_parameters(self, model):
        return [layer.lora_B[adapter_name(self.current)].weight for layer in lora_layers(model).values()]

    def after_task(self, model, task_index: int, task) -> None:
        layers = lora_layers(model)
        covariances = input_covariances(model, layers, task.input_batches())
        threshold = self.threshold(task_index)
        for name in layers:
            self.bases[name] = grow_basis(covariances[name], self.bases.get(name), threshold)

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        return model.disable_adapter() if tasks_learnt == 0 else contextlib.nullcontext()

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        save_adapter(model, directory / f"adapter_{adapter_name(task_index)}.safetensors", adapter_name(task_index))
        safetensors.torch.save_file({k: v.contiguous() for k, v in self.bases.items()}, str(directory / BASIS_FILE))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        for t, directory in enumerate(directories):
            if adapter_name(t) not in model.peft_config:
                model.add_adapter(adapter_name(t), self.config)
            load_adapter(model, directory / f"adapter_{adapter_name(t)}.safetensors", adapter_name(t))
        self.bases = safetensors.torch.load_file(str(directories[-1] / BASIS_FILE))
        self.current = len(directories) - 1
        self._activate_all(model, self.current)
