"""MEMIT and AlphaEdit as continual-learning methods: each edit task (a batch of requests) is
written into the MLP output projections of ``layers`` at once (cl_runner/editing/memit.py).

``null_space: true`` is AlphaEdit: updates projected onto the null space of the preserved
keys, with the keys of the run's earlier batches accumulated (``method=alphaedit``). That
accumulated cache belongs to the run: it starts empty, is saved with each task's checkpoint
and restored on resume, and is never shared with another run.
"""

from __future__ import annotations

import time
from pathlib import Path

from cl_runner.editing.memit import MemitSettings, memit_update, null_space_projector
from cl_runner.editing.rome import RomeSettings
from cl_runner.editing.session import EditSession
from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod


class MemitEditor(ContinualMethod):
    def __init__(self, layers=(1, 2, 3, 4, 5), v_num_grad_steps: int = 25, v_lr: float = 0.5, v_weight_decay: float = 1e-3,
                 clamp_norm_factor: float = 4.0, kl_factor: float = 0.0625, mom2_update_weight: float = 15000.0, null_space: bool = False,
                 nullspace_threshold: float = 2e-2, l2: float = 10.0, covariance: dict | None = None, context_lengths=((10, 5),),
                 modules: dict | None = None, cache_dir: str | None = None):
        layers = tuple(layers)
        if not layers or any(not isinstance(l, int) or l < 0 for l in layers) or list(layers) != sorted(set(layers)):
            raise UserError(f"method.layers must be increasing layer indices, got {list(layers)}")
        value = RomeSettings(layer=layers[-1], v_num_grad_steps=v_num_grad_steps, v_lr=v_lr, v_weight_decay=v_weight_decay,
                             clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor)
        self.name = "alphaedit" if null_space else "memit"  # for messages
        self.settings = MemitSettings(layers, value, mom2_update_weight, null_space, nullspace_threshold, l2)
        self.session = EditSession(covariance, context_lengths, modules, cache_dir)
        self.projectors = {}

    def use_tokenizer(self, tokenizer) -> None:
        self.session.tokenizer = tokenizer

    def setup(self, model):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.check_model(model)
        return model

    def check_model(self, model) -> None:
        """A wrong layer or module name fails here, before any work (also used on a wrapped model's base)."""
        self.session.validate(model, self.settings.layers)
        self.session.modules.layer_module(model, self.settings.layers[-1])

    def trainable_parameters(self, model):
        return []

    def _key_cache(self) -> dict[int, object]:
        return {int(k.split(".")[1]): v for k, v in self.session.state.items() if k.startswith("key_cache.")}

    def learn(self, model, task_index: int, task, train) -> dict:
        requests = self.session.requests_of(task, self.name)
        started = time.perf_counter()
        template_groups = self.session.template_groups(model)
        moments = {layer: self.session.second_moment(model, layer) for layer in self.settings.layers}
        if self.settings.null_space and not self.projectors:
            self.projectors = {layer: null_space_projector(moments[layer], self.settings.nullspace_threshold) for layer in self.settings.layers}
        cache = self._key_cache() if self.settings.null_space else None
        before = self.session.history.snapshot(model, self.session.weight_names(self.settings.layers))
        _, fits = memit_update(model, self.session.tokenizer, list(requests), template_groups, self.settings, moments, self.session.modules, cache, self.projectors)
        if cache is not None:
            self.session.state = {f"key_cache.{layer}": value for layer, value in cache.items()}
        self.session.history.record(task.name, model, before)
        for step, fit in enumerate(fits, start=1):
            train.log_step({"step": step, "loss": fit.final_nll, "initial_loss": fit.initial_nll, "value_steps": fit.steps})
        return self.session.task_stats(len(requests), time.perf_counter() - started, [f.final_nll for f in fits])

    def rollback(self, model, task_name: str) -> bool:
        return self.session.history.rollback(task_name, model)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        self.session.save(model, directory)

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.session.load(model, directories)
