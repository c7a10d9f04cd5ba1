"""GEM (Lopez-Paz & Ranzato, 2017) and A-GEM (Chaudhry et al., 2019): gradient projection against an episodic memory.

One adapter (the ``peft:`` block, LoRA by default) trains through the sequence. After each
task, ``memory_per_task`` of its training examples (a seeded sample) join the episodic
memory. At every optimizer step of a later task, between backward and the step:

- ``agem``: the reference gradient g_ref of the loss on ``reference_size`` examples drawn from
  the whole memory; when the step's gradient g points against it (g . g_ref < 0), g becomes
  g - (g . g_ref / g_ref . g_ref) g_ref, so the memory's loss does not rise to first order;
- ``gem``: one gradient per earlier task, from its own memory (rows of G); when any G_k . g < 0,
  g becomes the closest vector z to g with G z >= 0, found through the dual of that quadratic
  program (``project_to_cone``, solved exactly); GEM's ``margin`` (memory strength) is a lower
  bound on each task's dual variable, which moves the step further into the allowed cone.

The step's record logs ``gradient_conflict`` (1 when the projection changed the gradient).
The memory is saved with each task's checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from cl_runner.errors import UserError
from cl_runner.formatting import TokenizedExample
from cl_runner.methods.base import ContinualMethod
from cl_runner.methods.peft_adapter import PeftAdapter

MEMORY_FILE = "episodic_memory.safetensors"
VARIANTS = ("gem", "agem")


def project_to_cone(g: np.ndarray, G: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """The z closest to ``g`` with ``G z >= 0``: z = g + G^T v, v solving GEM's dual

        min_v 1/2 v^T (G G^T) v + (G g)^T v   subject to   v >= margin

    exactly, by Lawson and Hanson's active-set method on the t x t Gram matrix (one variable per
    earlier task; task gradients are highly correlated, where gradient descent on the dual stalls).
    ``margin`` is GEM's memory strength: a lower bound on each task's dual variable, as in GEM's code.
    """
    P = G @ G.T
    c = G @ g + P @ np.full(len(P), margin)  # v = margin + u, u >= 0
    return g + G.T @ (margin + nonnegative_quadratic_minimum(P, c))


def nonnegative_quadratic_minimum(P: np.ndarray, c: np.ndarray, tolerance: float = 1e-12) -> np.ndarray:
    """argmin over u >= 0 of 1/2 u^T P u + c^T u for a positive semi-definite P (Lawson-Hanson NNLS in Gram form)."""
    size = len(c)
    u, passive = np.zeros(size), np.zeros(size, dtype=bool)
    scale = tolerance * max(1.0, float(np.abs(P).max()), float(np.abs(c).max()))
    for _ in range(3 * size + 1):
        descent = -(P @ u + c)
        if passive.all() or descent[~passive].max() <= scale:
            break
        passive[np.flatnonzero(~passive)[np.argmax(descent[~passive])]] = True
        while True:
            trial = np.zeros(size)
            trial[passive] = np.linalg.lstsq(P[np.ix_(passive, passive)], -c[passive], rcond=None)[0]
            if (trial[passive] > 0).all():
                u = trial
                break
            blocking = passive & (trial <= 0)
            step = np.min(u[blocking] / (u[blocking] - trial[blocking]))
            u = u + step * (trial - u)
            passive &= u > scale
            u[~passive] = 0.0
    return u


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


class GradientEpisodicMemory(ContinualMethod):
    def __init__(self, peft: dict, variant: str = "agem", memory_per_task: int = 16, reference_size: int = 16, margin: float = 0.0, seed: int = 0):
        if variant not in VARIANTS:
            raise UserError(f"method.variant '{variant}' is not one of {list(VARIANTS)}")
        for key, value in (("memory_per_task", memory_per_task), ("reference_size", reference_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"method.{key} must be a positive integer, got {value!r}")
        if not isinstance(margin, (int, float)) or margin < 0:
            raise UserError(f"method.margin must be a non-negative number, got {margin!r}")
        self.adapter = PeftAdapter(peft, mode="sequential")
        self.variant, self.memory_per_task, self.reference_size = variant, memory_per_task, reference_size
        self.margin, self.seed = float(margin), seed
        self.memories: list[list[TokenizedExample]] = []
        self.current = 0
        self._conflict = None

    def setup(self, model):
        return self.adapter.setup(model)

    def before_task(self, model, task_index: int, task) -> None:
        self.adapter.before_task(model, task_index, task)
        self.current = task_index

    def trainable_parameters(self, model):
        return self.adapter.trainable_parameters(model)

    def consolidate(self, model, task_index: int, examples, gradients) -> None:
        rng = random.Random(f"{self.seed}-memory-{task_index}")
        self.memories = self.memories[:task_index]
        self.memories.append(rng.sample(list(examples), min(self.memory_per_task, len(examples))))

    def adjust_gradients(self, model, parameters, gradients, step: int) -> None:
        if not self.memories:
            return
        g = flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters])
        if self.variant == "agem":
            pool = [e for memory in self.memories for e in memory]
            rng = random.Random(f"{self.seed}-agem-{self.current}-{step}")
            reference = flat(gradients.of(rng.sample(pool, min(self.reference_size, len(pool)))))
            dot = float(g @ reference)
            conflict = dot < 0
            if conflict:
                g = g - dot / float(reference @ reference) * reference
        else:
            G = torch.stack([flat(gradients.of(memory)) for memory in self.memories])
            conflict = bool((G @ g < 0).any())
            if conflict:
                g = torch.from_numpy(project_to_cone(g.numpy(force=True), G.numpy(force=True), self.margin)).to(g.device)
        self._conflict = float(conflict)
        if conflict:
            offset = 0
            for p in parameters:
                if p.grad is not None:  # a parameter without a gradient stays untouched by the optimizer
                    p.grad = g[offset : offset + p.numel()].view(p.shape).to(p.dtype)
                offset += p.numel()

    def step_report(self):
        return {"gradient_conflict": self._conflict} if self._conflict is not None else None

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        return self.adapter.eval_context(model, tasks_learnt, task_index)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        self.adapter.save_checkpoint(model, directory, task_index)
        examples = [(t, e) for t, memory in enumerate(self.memories) for e in memory]
        state = {
            "task": torch.tensor([t for t, _ in examples], dtype=torch.int64),
            "length": torch.tensor([len(e.input_ids) for _, e in examples], dtype=torch.int64),
            "input_ids": torch.tensor([i for _, e in examples for i in e.input_ids], dtype=torch.int64),
            "labels": torch.tensor([i for _, e in examples for i in e.labels], dtype=torch.int64),
        }
        safetensors.torch.save_file(state, str(directory / MEMORY_FILE))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.adapter.load_checkpoint(model, directories)
        state = safetensors.torch.load_file(str(directories[-1] / MEMORY_FILE))
        ends = state["length"].cumsum(0).tolist()
        starts = [0, *ends[:-1]]
        self.memories = [[] for _ in range(int(state["task"].max()) + 1)] if len(ends) else []
        for t, start, end in zip(state["task"].tolist(), starts, ends):
            self.memories[t].append(TokenizedExample(state["input_ids"][start:end].tolist(), state["labels"][start:end].tolist()))
        self.current = len(directories) - 1
