"""Where an editor reads and writes inside a model: module-name templates from the method YAML.

Editors never look at the model's name. The YAML says, with ``{}`` for the layer index, which
module is the MLP's output projection (the edited weight: its input is the key, its output
the value) and which module is a decoder layer (MEMIT's residual stream):

    LLaMA / Qwen / SmolLM2:  mlp_out: model.layers.{}.mlp.down_proj,  layer: model.layers.{}
    GPT-2:                   mlp_out: transformer.h.{}.mlp.c_proj,   layer: transformer.h.{}

GPT-2's projections are ``Conv1D`` modules whose weight is stored (in, out), the transpose of
``nn.Linear``'s; :func:`outer_update` writes an update in whichever orientation the module uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_runner.errors import UserError


@dataclass(frozen=True)
class ModuleTemplates:
    mlp_out: str = "model.layers.{}.mlp.down_proj"
    layer: str = "model.layers.{}"

    def module(self, model: torch.nn.Module, template: str, layer: int) -> torch.nn.Module:
        name = template.format(layer)
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise UserError(f"method.modules: no module '{name}' in {type(model).__name__} (set method.modules.* to this model's names)") from None

    def mlp_out_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return self.module(model, self.mlp_out, layer)

    def layer_module(self, model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return self.module(model, self.layer, layer)


def stores_transposed(module: torch.nn.Module) -> bool:
    """True for GPT-2's Conv1D (weight stored (in, out)); False for nn.Linear (out, in)."""
    if isinstance(module, torch.nn.Linear):
        return False
    if hasattr(module, "nf") and hasattr(module, "weight"):  # transformers' Conv1D
        return True
    raise UserError(f"cannot edit a {type(module).__name__}: editors write nn.Linear or Conv1D weights")


def outer_update(module: torch.nn.Module, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The weight delta mapping ``keys`` (in, n) to ``values`` (out, n): ``values @ keys.T``, in the module's orientation."""
    delta = values @ keys.T  # (out, in)
    return delta.T.contiguous() if stores_transposed(module) else delta


def num_layers(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not count:
        raise UserError(f"cannot tell how many layers {type(model).__name__} has (config.num_hidden_layers)")
    return int(count)
