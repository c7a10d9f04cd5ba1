"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) on the trainable parameters.

One adapter (the ``peft:`` block, LoRA by default) trains through the sequence, as in
``seq_lora``. After each task the diagonal Fisher information of the trainable parameters is
estimated on ``fisher_examples`` of the task's training examples (a seeded sample): the mean
over batches (``fisher_batch_size``, 1 = per example, the estimate's definition; larger batches
are cheaper and underestimate it) of the squared gradient of the answers' log-likelihood
(summed over answer tokens, so long answers are not discounted), with the data's answers
(``fisher: empirical``) or answers drawn from the model's own next-token distribution
(``fisher: sampled``, the "true" Fisher: each token drawn given the data's earlier tokens). Fishers add up over tasks, the older ones multiplied
by ``decay`` at each new task (1: plain accumulation; below 1: online EWC, Schwarz et al.
2018), and the anchor is the weights after the last task. While learning later tasks the loss
gains ``weight / 2 * sum_i F_i (theta_i - anchor_i)^2``, logged as ``ewc_penalty``
(unweighted).
"""

from __future__ import annotations

import random
from pathlib import Path

import safetensors.torch
import torch

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.methods.peft_adapter import PeftAdapter

STATE_FILE = "ewc_state.safetensors"
FISHERS = ("empirical", "sampled")  # sampled: the true Fisher, answers drawn from the model


class EWC(ContinualMethod):
    def __init__(self, peft: dict, weight: float = 1.0e4, fisher: str = "empirical", decay: float = 1.0,
                 fisher_batch_size: int = 1, fisher_examples: int | None = 64, seed: int = 0):
        if fisher not in FISHERS:
            raise UserError(f"method.fisher '{fisher}' is not one of {list(FISHERS)}")
        if not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"method.weight must be a non-negative number, got {weight!r}")
        if not isinstance(decay, (int, float)) or not 0 <= decay <= 1:
            raise UserError(f"method.decay must be a number in [0, 1], got {decay!r}")
        if not isinstance(fisher_batch_size, int) or fisher_batch_size < 1:
            raise UserError(f"method.fisher_batch_size must be a positive integer, got {fisher_batch_size!r}")
        if fisher_examples is not None and (not isinstance(fisher_examples, int) or isinstance(fisher_examples, bool) or fisher_examples < 1):
            raise UserError(f"method.fisher_examples must be a positive integer or null (all), got {fisher_examples!r}")
        self.adapter = PeftAdapter(peft, mode="sequential")
        self.weight, self.fisher_kind, self.decay = float(weight), fisher, float(decay)
        self.fisher_batch_size, self.fisher_examples, self.seed = fisher_batch_size, fisher_examples, seed
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self._penalty = None

    def setup(self, model):
        return self.adapter.setup(model)

    def before_task(self, model, task_index: int, task) -> None:
        self.adapter.before_task(model, task_index, task)

    def trainable_parameters(self, model):
        return self.adapter.trainable_parameters(model)

    def named_trainable(self, model) -> dict[str, torch.nn.Parameter]:
        wanted = {id(p) for p in self.trainable_parameters(model)}
        return {name: p for name, p in model.named_parameters() if id(p) in wanted}

    def extra_loss(self, model, batch, outputs):
        if not self.fisher:
            return None
        terms = [(self.fisher[name] * (p.float() - self.anchor[name]).square()).sum() for name, p in self.named_trainable(model).items()]
        penalty = torch.stack(terms).sum()
        self._penalty = float(penalty.detach())
        return self.weight / 2 * penalty

    def step_report(self):
        return {"ewc_penalty": self._penalty} if self._penalty is not None else None

    def consolidate(self, model, task_index: int, examples, gradients) -> None:
        named = self.named_trainable(model)
        used = list(examples)
        if self.fisher_examples and len(used) > self.fisher_examples:
            used = random.Random(f"{self.seed}-fisher-{task_index}").sample(used, self.fisher_examples)
        sampler = None
        if self.fisher_kind == "sampled":
            sampler = torch.Generator().manual_seed(self.seed * 1000 + task_index)
        new = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in named.values()]
        batches = 0
        for grads in gradients.per_batch(used, self.fisher_batch_size, sample_from=sampler, summed=True):
            for total, grad in zip(new, grads):
                total.add_(grad.square())
            batches += 1
        for (name, p), total in zip(named.items(), new):
            older = self.fisher.get(name)
            self.fisher[name] = total / max(batches, 1) + (self.decay * older if older is not None else 0)
            self.anchor[name] = p.detach().float().clone()
        self._penalty = None

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        return self.adapter.eval_context(model, tasks_learnt, task_index)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        self.adapter.save_checkpoint(model, directory, task_index)
        state = {f"fisher/{n}": t for n, t in self.fisher.items()} | {f"anchor/{n}": t for n, t in self.anchor.items()}
        safetensors.torch.save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / STATE_FILE))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.adapter.load_checkpoint(model, directories)
        device = next(model.parameters()).device
        state = safetensors.torch.load_file(str(directories[-1] / STATE_FILE), device=str(device))
        self.fisher = {k.removeprefix("fisher/"): v for k, v in state.items() if k.startswith("fisher/")}
        self.anchor = {k.removeprefix("anchor/"): v for k, v in state.items() if k.startswith("anchor/")}
