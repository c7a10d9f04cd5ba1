"""ROME as a continual-learning method: each edit task's requests are written into the weights
one after another with ROME's closed-form rank-one update (cl_runner/editing/rome.py), no
gradient training of the model.

The covariance of the edited layer's inputs is estimated once (cached across runs), the
context templates are sampled once; both, and each task's exact weight change (edit history,
for rollback), are saved with the task's checkpoint. A task that is not an edit task (no
requests) is refused: use ``edit_plus_lora`` for sequences that mix both.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import safetensors.torch
import torch

from cl_runner.editing.contexts import context_templates
from cl_runner.editing.covariance import second_moment, settings_from
from cl_runner.editing.history import EditHistory
from cl_runner.editing.layout import ModuleTemplates
from cl_runner.editing.rome import RomeSettings, rome_update
from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.models import default_cache_dir

log = logging.getLogger(__name__)
TEMPLATES_FILE = "context_templates.json"
WEIGHTS_FILE = "edited_weights.safetensors"


class RomeEditor(ContinualMethod):
    def __init__(self, layer: int = 2, v_num_grad_steps: int = 25, v_lr: float = 0.5, v_weight_decay: float = 1e-3, clamp_norm_factor: float = 4.0,
                 kl_factor: float = 0.0625, mom2_adjustment: bool = True, covariance: dict | None = None, context_lengths=((5, 10), (10, 10)),
                 modules: dict | None = None, cache_dir: str | None = None, ridge: float = 0.0):
        if not isinstance(layer, int) or layer < 0:
            raise UserError(f"method.layer must be a layer index (an integer >= 0), got {layer!r}")
        self.settings = RomeSettings(layer=layer, v_num_grad_steps=v_num_grad_steps, v_lr=v_lr, v_weight_decay=v_weight_decay,
                                     clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor, mom2_adjustment=mom2_adjustment)
        self.covariance_settings = settings_from(covariance)
        self.context_lengths = [tuple(pair) for pair in context_lengths]
        self.modules = ModuleTemplates(**dict(modules or {}))
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "covariance"
        self.ridge = ridge
        self.tokenizer = None
        self.templates: list[str] | None = None
        self.second_moment: torch.Tensor | None = None
        self.history = EditHistory()

    def use_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def setup(self, model):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.modules.mlp_out_module(model, self.settings.layer)  # a wrong layer or module name fails before any work
        return model

    def trainable_parameters(self, model):
        return []

    def _prepare(self, model) -> None:
        if self.templates is None:
            self.templates = context_templates(model, self.tokenizer, self.context_lengths)
        if self.settings.mom2_adjustment and self.second_moment is None:
            name = self.modules.mlp_out.format(self.settings.layer)
            self.second_moment = second_moment(model, self.tokenizer, self.modules.mlp_out_module(model, self.settings.layer), name,
                                               self.covariance_settings, self.cache_dir)

    def learn(self, model, task_index: int, task, train) -> dict:
        if not task.requests:
            raise UserError(f"method=rome edits facts, but task '{task.name}' has no edit requests (type: edit); use edit_plus_lora for mixed sequences")
        started = time.perf_counter()
        self._prepare(model)
        weight = self.modules.mlp_out.format(self.settings.layer) + ".weight"
        before = self.history.snapshot(model, [weight])
        nlls = []
        for step, request in enumerate(task.requests, start=1):
            deltas, fit = rome_update(model, self.tokenizer, request, self.templates, self.settings, self.second_moment, self.modules, self.ridge)
            with torch.no_grad():
                for name, delta in deltas.items():
                    parameter = model.get_parameter(name)
                    parameter.add_(delta.to(parameter.device, parameter.dtype))
            nlls.append(fit.final_nll)
            train.log_step({"step": step, "loss": fit.final_nll, "initial_loss": fit.initial_nll, "value_steps": fit.steps})
        self.history.record(task.name, model, before)
        seconds = time.perf_counter() - started
        return {"steps": len(task.requests), "tokens": 0, "seconds": seconds, "tokens_per_s": 0.0,
                "final_loss": sum(nlls) / len(nlls), "trainable_parameters": 0}

    def rollback(self, model, task_name: str) -> bool:
        """Undo a task's edits; True when the weights are restored bit for bit (see editing/history.py)."""
        return self.history.rollback(task_name, model)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        names = sorted({n for changes in self.history.changes.values() for n in changes})
        safetensors.torch.save_file({n: model.get_parameter(n).detach().cpu().contiguous() for n in names}, str(directory / WEIGHTS_FILE))
        (directory / TEMPLATES_FILE).write_text(json.dumps(self.templates or []))
        last = list(self.history.changes)[-1] if self.history.changes else None
        if last is not None:
            self.history.save(directory, last)

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        for directory in directories:
            if (directory / "edit_history.safetensors").exists():
                self.history.load(directory)
        last = directories[-1]
        with torch.no_grad():
            for name, value in safetensors.torch.load_file(str(last / WEIGHTS_FILE)).items():
                parameter = model.get_parameter(name)
                parameter.copy_(value.to(parameter.device, parameter.dtype))
        self.templates = json.loads((last / TEMPLATES_FILE).read_text()) or None
