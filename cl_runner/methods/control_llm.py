"""Control LLM (Wei et al. 2025, arXiv:2501.10979, linkedin/ControlLLM): layer expansion with interpolation.

Every ``expand_every``-th decoder layer (the last of each block, as in the reference: layers 3,
7, 11, ... for 4) gets a trainable copy that runs in parallel on the same input; the original
stays frozen, as does everything else. The layer's output interpolates the two hidden states:

- ``lerp``: ``h = h_pre + w (h_exp - h_pre)`` with a fixed ``w`` (0.5);
- ``dlerp``: a learnt gate per token, ``w = sigmoid(W [h_pre; h_exp] + b)`` (``b`` starts at 0).

The copy starts as an exact copy, so before training the model computes exactly what the base
computes. ``divergence_weight`` adds the mean squared difference between the two hidden states
(per token, averaged over real tokens and over expanded layers) to the loss, which keeps the
expanded branch near the original (0 turns it off).
"""

from __future__ import annotations

import copy
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from cl_runner.errors import UserError
from cl_runner.forward import decoder_layers
from cl_runner.methods.base import ContinualMethod

MERGES = ("lerp", "dlerp")
WEIGHTS_FILE = "control_llm.safetensors"


class ExpandedLayer(nn.Module):
    """A frozen decoder layer and its trainable copy on the same input, their outputs interpolated."""

    def __init__(self, pretrained: nn.Module, merge: str, lerp_weight: float, hidden_size: int):
        super().__init__()
        self.pretrained = pretrained
        self.expanded = copy.deepcopy(pretrained)
        self.merge, self.lerp_weight = merge, lerp_weight
        if merge == "dlerp":
            self.gate = nn.Linear(2 * hidden_size, 1).to(next(pretrained.parameters()).dtype)
            nn.init.zeros_(self.gate.bias)
        self.track_divergence = False  # set by the method when the divergence loss is on
        self.divergence: torch.Tensor | None = None  # per token, from the last forward pass
        if hasattr(pretrained, "attention_type"):  # read by models that mix sliding and full attention
            self.attention_type = pretrained.attention_type
        self.original_slot = self.cache_slot = None

    def use_cache_slot(self, slot: int) -> None:
        """The copy's own slot in a KV cache (generation, shared prefixes): it must not write into the original's."""
        attention = getattr(self.expanded, "self_attn", None)
        if attention is not None and hasattr(attention, "layer_idx"):
            self.original_slot, self.cache_slot = attention.layer_idx, slot
            attention.layer_idx = slot

    def _add_cache_slot(self, kwargs) -> None:
        cache = kwargs.get("past_key_values") or kwargs.get("cache")
        if cache is None or self.cache_slot is None or not hasattr(cache, "layers"):
            return
        while len(cache.layers) <= self.cache_slot:
            # An empty layer like the original's (same kind and window), before the original fills its own.
            cache.layers.append(copy.copy(cache.layers[self.original_slot]))

    def forward(self, *args, **kwargs):
        self._add_cache_slot(kwargs)
        out_pre = self.pretrained(*args, **kwargs)
        out_exp = self.expanded(*args, **kwargs)
        h_pre = out_pre[0] if isinstance(out_pre, tuple) else out_pre
        h_exp = out_exp[0] if isinstance(out_exp, tuple) else out_exp
        if self.merge == "dlerp":
            weight = torch.sigmoid(self.gate(torch.cat([h_pre, h_exp], dim=-1)))
        else:
            weight = self.lerp_weight
        merged = h_pre + weight * (h_exp - h_pre)
        # Only when the loss uses it: the tensor keeps this pass's graph alive until the next one.
        self.divergence = (h_exp.float() - h_pre.float()).pow(2).mean(-1) if self.training and self.track_divergence else None
        return (merged, *out_pre[1:]) if isinstance(out_pre, tuple) else merged


def real_token_mask(batch: dict, length: int) -> torch.Tensor:
    """Which of the last ``length`` positions of each row hold real tokens, from the batch's mask."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones(batch["input_ids"].shape[:2], dtype=torch.bool)[:, -length:]
    if mask.dim() == 2:
        return mask[:, -length:].bool()
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)[:, -length:]  # a real token attends to itself
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0


class ControlLLM(ContinualMethod):
    def __init__(self, expand_every: int = 4, merge: str = "lerp", lerp_weight: float = 0.5, divergence_weight: float = 0.0):
        if not isinstance(expand_every, int) or expand_every < 1:
            raise UserError(f"method.expand_every must be a positive integer, got {expand_every!r}")
        if merge not in MERGES:
            raise UserError(f"method.merge '{merge}' is not one of {list(MERGES)}")
        if not 0 <= lerp_weight <= 1 or divergence_weight < 0:
            raise UserError("method.lerp_weight must be in [0, 1] and method.divergence_weight non-negative")
        self.expand_every, self.merge = expand_every, merge
        self.lerp_weight, self.divergence_weight = float(lerp_weight), float(divergence_weight)

    def expanded_layers(self, model) -> list[ExpandedLayer]:
        return [m for m in model.modules() if isinstance(m, ExpandedLayer)]

    def setup(self, model):
        model.requires_grad_(False)
        layers = decoder_layers(model)
        chosen = [i for i in range(len(layers)) if (i + 1) % self.expand_every == 0] or [len(layers) - 1]
        for slot, index in enumerate(chosen, start=len(layers)):
            layers[index] = ExpandedLayer(layers[index], self.merge, self.lerp_weight, model.config.hidden_size)
            layers[index].use_cache_slot(slot)
            layers[index].track_divergence = self.divergence_weight > 0
            layers[index].expanded.requires_grad_(True)
            if self.merge == "dlerp":
                layers[index].gate.requires_grad_(True)
        return model

    def extra_loss(self, model, batch, outputs):
        if not self.divergence_weight:
            return None
        losses = []
        for layer in self.expanded_layers(model):
            per_token = layer.divergence
            if per_token is None:  # not training (no graph to follow)
                return None
            mask = real_token_mask(batch, per_token.shape[1]).to(per_token.device)
            losses.append(per_token[mask].mean())
        return self.divergence_weight * torch.stack(losses).mean()

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        state = {name: p.detach().contiguous().cpu() for name, p in self.trainable_state(model).items()}
        safetensors.torch.save_file(state, str(directory / WEIGHTS_FILE))

    @torch.no_grad()
    def load_checkpoint(self, model, directories: list[Path]) -> None:
        state = safetensors.torch.load_file(str(directories[-1] / WEIGHTS_FILE))
        params = self.trainable_state(model)
        if set(state) != set(params):
            raise UserError(f"{directories[-1] / WEIGHTS_FILE} does not match the expanded model; delete the run directory to start over")
        for name, value in state.items():
            params[name].copy_(value)
