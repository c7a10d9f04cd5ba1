"""ROME as a continual-learning method: each edit task's requests are written into the weights
one after another with ROME's closed-form rank-one update (cl_runner/editing/rome.py); the
model is not trained by gradient.

The covariance of the edited layer's inputs is estimated once (cached across runs), the
context templates are sampled once; both, and each task's exact weight change (edit history,
for rollback), are kept by an ``EditSession`` and saved with the task's checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from cl_runner.editing.rome import RomeSettings, rome_update
from cl_runner.editing.session import EditSession
from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod

log = logging.getLogger(__name__)


class RomeEditor(ContinualMethod):
    def __init__(self, layer: int | str = 2, v_num_grad_steps: int = 25, v_lr: float = 0.5, v_weight_decay: float = 1e-3, clamp_norm_factor: float = 4.0,
                 kl_factor: float = 0.0625, mom2_adjustment: bool = True, covariance: dict | None = None, context_lengths=((5, 10), (10, 10)),
                 modules: dict | None = None, cache_dir: str | None = None, ridge: float = 0.0, auto_layer_facts: int = 3):
        if layer != "auto" and (not isinstance(layer, int) or layer < 0):
            raise UserError(f"method.layer must be a layer index (an integer >= 0) or auto, got {layer!r}")
        self.auto_layer = layer == "auto"
        self.auto_layer_facts = auto_layer_facts
        self.settings = RomeSettings(layer=-1 if self.auto_layer else layer, v_num_grad_steps=v_num_grad_steps, v_lr=v_lr, v_weight_decay=v_weight_decay,
                                     clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor, mom2_adjustment=mom2_adjustment)
        self.session = EditSession(covariance, context_lengths, modules, cache_dir)
        self.ridge = ridge

    def use_tokenizer(self, tokenizer) -> None:
        self.session.tokenizer = tokenizer

    def setup(self, model):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.check_model(model)
        return model

    def check_model(self, model) -> None:
        """A wrong layer or module name fails here, before any work (also used on a wrapped model's base)."""
        if not self.auto_layer:
            self.session.validate(model, [self.settings.layer])

    def _choose_layer(self, model, requests) -> None:
        """``layer: auto``: the layer whose MLP output at the last subject token carries the most of
        the facts (causal tracing over the first task's first ``auto_layer_facts`` requests)."""
        from cl_runner.editing.tracing import embedding_noise_scale, subject_range, trace

        chosen = requests[: self.auto_layer_facts]
        noise = embedding_noise_scale(model, self.session.tokenizer, [r.subject for r in chosen])
        effects = []
        for request in chosen:
            last = subject_range(self.session.tokenizer, request.prompt, request.subject)[2]
            effects.append(trace(model, self.session.tokenizer, request.prompt, request.subject, noise, kind="mlp", positions=[last]).effect[last])
        layer = int(torch.stack(effects).mean(0).argmax())
        log.info("layer: auto -> %d (largest mean MLP effect at the last subject token over %d facts)", layer, len(chosen))
        self._use_layer(layer)

    def _use_layer(self, layer: int) -> None:
        self.settings = dataclasses.replace(self.settings, layer=layer)
        self.session.state["auto_layer"] = torch.tensor([layer])

    def trainable_parameters(self, model):
        return []

    def learn(self, model, task_index: int, task, train) -> dict:
        requests = self.session.requests_of(task, "rome")
        started = time.perf_counter()
        if self.settings.layer < 0:
            self._choose_layer(model, requests)
        templates = self.session.context_templates(model)
        second_moment = self.session.second_moment(model, self.settings.layer) if self.settings.mom2_adjustment else None
        before = self.session.history.snapshot(model, self.session.weight_names([self.settings.layer]))
        losses = []
        for step, request in enumerate(requests, start=1):
            deltas, fit = rome_update(model, self.session.tokenizer, request, templates, self.settings, second_moment, self.session.modules, self.ridge)
            with torch.no_grad():
                for name, delta in deltas.items():
                    parameter = model.get_parameter(name)
                    parameter.add_(delta.to(parameter.device, parameter.dtype))
            losses.append(fit.final_nll)
            train.log_step({"step": step, "loss": fit.final_nll, "initial_loss": fit.initial_nll, "value_steps": fit.steps})
        self.session.history.record(task.name, model, before)
        return self.session.task_stats(len(requests), time.perf_counter() - started, losses)

    def rollback(self, model, task_name: str) -> bool:
        """Undo a task's edits; True when the weights are restored bit for bit (see editing/history.py)."""
        return self.session.history.rollback(task_name, model)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        self.session.save(model, directory)

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.session.load(model, directories)
        if "auto_layer" in self.session.state:
            self._use_layer(int(self.session.state["auto_layer"][0]))
