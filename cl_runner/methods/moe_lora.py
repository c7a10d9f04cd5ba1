"""A mixture of LoRA experts with a learnt router: one expert per task, earlier experts frozen.

Every targeted linear layer (``q_proj`` and ``v_proj`` by default) gets one LoRA expert per
task (A random, B zero) and a router: a linear map from the layer's input to one logit per
expert (the new expert's starts at zero). Each token's output is

    W x + (alpha / r) * sum_e softmax(router(x))_e * B_e A_e x

(dense gating, as LoRAMoE). While task t trains, its expert and the whole router train (the
router from the second task on: with one expert there is nothing to route); earlier experts
stay frozen. Inference needs no task id: the router decides per token. A new expert adds
nothing itself (B is zero) but takes its share of the softmax: the earlier experts' outputs are
scaled down until the router learns to send their tokens back to them (no load-balancing
term, unlike LoRAMoE). After each task, the router's choice on that task's training inputs
(the mean gate of each expert over real tokens and layers) is kept and reported per row in
``results.json`` (``method_reports``: ``router_choice``); it is measured once, right after the
task, so a later drift of the router away from an earlier task's expert does not show there
(the accuracy matrix shows its effect).
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod

CHOICES_FILE = "router_choice.json"


class MixtureOfLoRALinear(nn.Module):
    """A frozen linear layer plus routed LoRA experts (their number grows with the tasks)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        super().__init__()
        self.base, self.r, self.scaling = base, r, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B, self.router = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        self.experts_on = True  # off: the base layer alone (row 0 of the matrix)
        self.gate_record: list | None = None  # [sum of gates, tokens] while the router's choice is measured
        self.token_mask: torch.Tensor | None = None

    def add_expert(self) -> None:
        weight = self.base.weight
        A = torch.empty(self.r, weight.shape[1], dtype=weight.dtype, device=weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # PEFT's LoRA initialisation
        self.lora_A.append(nn.Parameter(A))
        self.lora_B.append(nn.Parameter(torch.zeros(weight.shape[0], self.r, dtype=weight.dtype, device=weight.device)))
        self.router.append(nn.Parameter(torch.zeros(weight.shape[1], dtype=weight.dtype, device=weight.device)))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x @ torch.stack(list(self.router), dim=1), dim=-1)  # [..., experts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.experts_on or not len(self.lora_A):
            return out
        gates = self.gates(x)
        if self.gate_record is not None:
            mask = self.token_mask if self.token_mask is not None else torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
            self.gate_record[0] = self.gate_record[0] + gates[mask].sum(0).float()
            self.gate_record[1] += int(mask.sum())
        dropped = self.dropout(x)
        for e, (A, B) in enumerate(zip(self.lora_A, self.lora_B)):
            out = out + self.scaling * gates[..., e : e + 1] * ((dropped @ A.T) @ B.T)
        return out


def mixture_layers(model) -> dict[str, MixtureOfLoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MixtureOfLoRALinear)}


class MoELoRA(ContinualMethod):
    def __init__(self, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0, target_modules: list = ("q_proj", "v_proj")):
        if not (isinstance(r, int) and r >= 1):
            raise UserError(f"method.r must be a positive integer, got {r!r}")
        if not isinstance(lora_alpha, (int, float)) or lora_alpha <= 0:
            raise UserError(f"method.lora_alpha must be a positive number, got {lora_alpha!r}")
        if not isinstance(lora_dropout, (int, float)) or not 0 <= lora_dropout < 1:
            raise UserError(f"method.lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
        self.r, self.alpha, self.dropout, self.targets = r, float(lora_alpha), float(lora_dropout), tuple(target_modules)
        self.current = 0
        self.router_choice: dict[int, list[float]] = {}

    def setup(self, model):
        model.requires_grad_(False)
        replaced = 0
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in self.targets and isinstance(child, nn.Linear):
                    setattr(module, child_name, MixtureOfLoRALinear(child, self.r, self.alpha, self.dropout))
                    replaced += 1
        if not replaced:
            raise UserError(f"method.target_modules {list(self.targets)} match no linear layer of this model")
        self._grow(model, 1)
        return model

    def _grow(self, model, experts: int) -> None:
        for layer in mixture_layers(model).values():
            while len(layer.lora_A) < experts:
                layer.add_expert()

    def before_task(self, model, task_index: int, task) -> None:
        self._grow(model, task_index + 1)
        self.current = task_index
        model.requires_grad_(False)
        for p in self.trainable_parameters(model):
            p.requires_grad_(True)

    def trainable_parameters(self, model):
        layers = mixture_layers(model).values()
        expert = [p for layer in layers for p in (layer.lora_A[self.current], layer.lora_B[self.current])]
        router = [p for layer in layers for p in layer.router] if self.current > 0 else []  # one expert: nothing to route
        return expert + router

    @torch.no_grad()
    def after_task(self, model, task_index: int, task) -> None:
        """The router's choice on this task's training inputs: each expert's mean gate over real tokens and layers."""
        layers = list(mixture_layers(model).values())
        for layer in layers:
            layer.gate_record = [torch.zeros(()), 0]
        was_training = model.training
        model.eval()
        try:
            for batch in task.input_batches():
                for layer in layers:
                    layer.token_mask = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            totals = sum(torch.as_tensor(layer.gate_record[0]).cpu() for layer in layers)
            tokens = sum(layer.gate_record[1] for layer in layers)
        finally:
            model.train(was_training)
            for layer in layers:
                layer.gate_record, layer.token_mask = None, None
        self.router_choice[task_index] = [round(float(v), 6) for v in totals / max(tokens, 1)]

    def row_report(self, tasks_learnt: int):
        choices = {str(t): gates for t, gates in self.router_choice.items() if t < tasks_learnt}
        return {"router_choice": choices} if choices else None

    @contextlib.contextmanager
    def experts_off(self, model):
        layers = mixture_layers(model).values()
        for layer in layers:
            layer.experts_on = False
        try:
            yield
        finally:
            for layer in layers:
                layer.experts_on = True

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        return self.experts_off(model) if tasks_learnt == 0 else contextlib.nullcontext()

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        state = {}
        for name, layer in mixture_layers(model).items():
            state[f"{name}.lora_A"] = layer.lora_A[task_index]
            state[f"{name}.lora_B"] = layer.lora_B[task_index]
            state[f"{name}.router"] = torch.stack(list(layer.router))  # the router as this task left it (all rows)
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "mixture_of_lora.safetensors"))
        (directory / CHOICES_FILE).write_text(json.dumps({str(t): g for t, g in self.router_choice.items()}))

    @torch.no_grad()
    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self._grow(model, len(directories))
        layers = mixture_layers(model)
        for t, directory in enumerate(directories):
            state = safetensors.torch.load_file(str(directory / "mixture_of_lora.safetensors"))
            for name, layer in layers.items():
                layer.lora_A[t].copy_(state[f"{name}.lora_A"])
                layer.lora_B[t].copy_(state[f"{name}.lora_B"])
                if t == len(directories) - 1:
                    for e, row in enumerate(state[f"{name}.router"]):
                        layer.router[e].copy_(row)
        self.router_choice = {int(t): g for t, g in json.loads((directories[-1] / CHOICES_FILE).read_text()).items()}
        self.before_task(model, len(directories) - 1, None)
