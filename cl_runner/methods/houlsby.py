"""Houlsby adapters (Houlsby et al. 2019): a bottleneck after the attention block and after the MLP
of every decoder layer, on a frozen model; one set trained through the sequence.

Each adapter maps the sublayer's output h to ``h + up(act(down(h)))`` before the residual
addition. ``up`` starts at zero, so before training the model computes exactly what the base
model computes. (The ``adapters`` library pins an older transformers, hence this small module.)
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from cl_runner.errors import UserError
from cl_runner.forward import decoder_layers
from cl_runner.methods.base import ContinualMethod

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
ADAPTERS_FILE = "houlsby_adapters.safetensors"


class Bottleneck(nn.Module):
    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck_size, hidden_size)
        nn.init.zeros_(self.up.weight)  # the identity at the start: the base model's outputs, bit for bit
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.activation(self.down(hidden)))


def _adapt_output(module, args, output):
    """Forward hook: the sublayer's own adapter (an attribute, so copies of the model keep theirs)."""
    # Attention blocks return (output, weights, ...): only the output is adapted.
    if isinstance(output, tuple):
        return (module.houlsby_adapter(output[0]), *output[1:])
    return module.houlsby_adapter(output)


class HoulsbyAdapters(ContinualMethod):
    def __init__(self, bottleneck_size: int = 64, activation: str = "relu"):
        if not isinstance(bottleneck_size, int) or isinstance(bottleneck_size, bool) or bottleneck_size < 1:
            raise UserError(f"method.bottleneck_size must be a positive integer, got {bottleneck_size!r}")
        if activation not in ACTIVATIONS:
            raise UserError(f"method.activation '{activation}' is not one of {list(ACTIVATIONS)}")
        self.bottleneck_size = bottleneck_size
        self.activation = activation

    def setup(self, model):
        model.requires_grad_(False)
        layers = decoder_layers(model)
        hidden = model.config.hidden_size
        dtype = next(model.parameters()).dtype
        adapters = nn.ModuleDict()
        for index, layer in enumerate(layers):
            attention = Bottleneck(hidden, self.bottleneck_size, self.activation).to(dtype)
            mlp = Bottleneck(hidden, self.bottleneck_size, self.activation).to(dtype)
            adapters[f"{index}_attention"], adapters[f"{index}_mlp"] = attention, mlp
            for sublayer, adapter in ((layer.self_attn, attention), (layer.mlp, mlp)):
                sublayer.houlsby_adapter = adapter  # a submodule: moved with the model, trainable
                sublayer.register_forward_hook(_adapt_output)
        model.houlsby_adapters = adapters  # the same modules, under one name for checkpoints
        return model

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        safetensors.torch.save_model(model.houlsby_adapters, str(directory / ADAPTERS_FILE))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        device = next(model.parameters()).device
        safetensors.torch.load_model(model.houlsby_adapters, str(directories[-1] / ADAPTERS_FILE), device=str(device))
