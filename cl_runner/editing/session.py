"""What every editor method keeps through a run: the tokenizer, the context templates, the
covariance of each edited layer, the exact history of weight changes, and their checkpoint.

Editor methods (cl_runner/methods/rome.py, memit.py) hold one ``EditSession`` and add only their
update rule. Everything here starts empty with each run and is restored from the run's own
checkpoints on resume; nothing is shared between runs except the covariance cache, which is
keyed by the model's weights, the layer and the corpus.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import safetensors.torch
import torch

from cl_runner.editing.contexts import context_templates
from cl_runner.editing.covariance import model_fingerprint, second_moment, settings_from
from cl_runner.editing.history import EditHistory
from cl_runner.editing.layout import ModuleTemplates
from cl_runner.errors import UserError
from cl_runner.models import default_cache_dir

log = logging.getLogger(__name__)
TEMPLATES_FILE = "context_templates.json"
WEIGHTS_FILE = "edited_weights.safetensors"
STATE_FILE = "editor_state.safetensors"
META_FILE = "editor_meta.json"


class EditSession:
    def __init__(self, covariance: dict | None = None, context_lengths=((5, 10), (10, 10)), modules: dict | None = None, cache_dir: str | None = None):
        self.covariance_settings = settings_from(covariance)
        self.context_lengths = [tuple(pair) for pair in context_lengths]
        self.modules = ModuleTemplates(**dict(modules or {}))
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir() / "covariance"
        self.tokenizer = None
        self.templates: list[str] | None = None
        self.second_moments: dict[int, torch.Tensor] = {}
        self.history = EditHistory()
        self.state: dict[str, torch.Tensor] = {}  # an editor's own tensors (AlphaEdit's key cache), checkpointed
        # The weights C is estimated on: those before this run's first edit, also after a resume.
        self.base_fingerprint: str | None = None

    def validate(self, model, layers) -> None:
        """The edited modules exist at ``layers`` and the weights are in a dtype editing works in."""
        for layer in layers:  # a wrong layer or module name fails before any work
            self.modules.mlp_out_module(model, layer)
        dtypes = {p.dtype for p in model.parameters()}
        if torch.float16 in dtypes:  # ROME's own pitfall list: fp16 breaks the v* fit and the solve
            raise UserError("editors need float32 (or bfloat16) weights; this model is float16: set model.dtype=float32")
        if torch.bfloat16 in dtypes:
            log.warning("editing a bfloat16 model: keys, values and updates are computed in float32, but the update is rounded to bfloat16 when applied")

    def context_templates(self, model) -> list[str]:
        if self.templates is None:
            self.templates = context_templates(model, self.tokenizer, self.context_lengths)
        return self.templates

    def template_groups(self, model) -> list[list[str]]:
        """The templates as sampled: the bare ``"{}"``, then one group per (tokens, count) of ``context_lengths``."""
        flat = self.context_templates(model)
        groups, start = [flat[:1]], 1
        for _, count in self.context_lengths:
            groups.append(flat[start : start + count])
            start += count
        return [g for g in groups if g]

    def second_moment(self, model, layer: int) -> torch.Tensor:
        if layer not in self.second_moments:
            name = self.modules.mlp_out.format(layer)
            self.base_fingerprint = self.base_fingerprint or model_fingerprint(model)
            self.second_moments[layer] = second_moment(model, self.tokenizer, self.modules.mlp_out_module(model, layer), name, self.covariance_settings,
                                                       self.cache_dir, self.base_fingerprint)
        return self.second_moments[layer]

    def weight_names(self, layers) -> list[str]:
        return [self.modules.mlp_out.format(layer) + ".weight" for layer in layers]

    @staticmethod
    def requests_of(task, method: str) -> list:
        if not task.requests:
            raise UserError(f"method={method} edits facts, but task '{task.name}' has no edit requests (type: edit); use edit_plus_lora for mixed sequences")
        return task.requests

    @staticmethod
    def task_stats(edits: int, seconds: float, losses: list[float]) -> dict:
        """What an editor's ``learn`` reports in place of the training loop's statistics."""
        return {"steps": edits, "tokens": 0, "seconds": seconds, "tokens_per_s": 0.0, "final_loss": sum(losses) / len(losses), "trainable_parameters": 0}

    def save(self, model, directory: Path) -> None:
        names = sorted({n for changes in self.history.changes.values() for n in changes})
        safetensors.torch.save_file({n: model.get_parameter(n).detach().cpu().contiguous() for n in names}, str(directory / WEIGHTS_FILE))
        safetensors.torch.save_file({k: v.contiguous() for k, v in self.state.items()}, str(directory / STATE_FILE))
        (directory / TEMPLATES_FILE).write_text(json.dumps(self.templates or []))
        (directory / META_FILE).write_text(json.dumps({"base_fingerprint": self.base_fingerprint}))
        if self.history.changes:
            self.history.save(directory, list(self.history.changes)[-1])

    def load(self, model, directories: list[Path]) -> None:
        for directory in directories:
            if (directory / "edit_history.safetensors").exists():
                self.history.load(directory)
        last = directories[-1]
        with torch.no_grad():
            for name, value in safetensors.torch.load_file(str(last / WEIGHTS_FILE)).items():
                parameter = model.get_parameter(name)
                parameter.copy_(value.to(parameter.device, parameter.dtype))
        self.state = dict(safetensors.torch.load_file(str(last / STATE_FILE)))
        self.templates = json.loads((last / TEMPLATES_FILE).read_text()) or None
        self.base_fingerprint = json.loads((last / META_FILE).read_text())["base_fingerprint"]
