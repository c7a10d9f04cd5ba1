"""Small helpers shared by the PEFT-based methods: build configs from YAML, save and load adapters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file, save_file

from cl_runner.errors import UserError


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def peft_config(block, key: str = "method.peft") -> PeftConfig:
    """A causal-LM PEFT config from a YAML block whose ``_target_`` names a ``peft`` config class.

    Any config class works (``peft.LoraConfig``, ``peft.PromptTuningConfig``, ``peft.IA3Config``,
    ``peft.OSFConfig``, ...); its other keys are the class's arguments. A bad block is a
    one-line UserError naming ``key``.
    """
    from cl_runner.config import locate

    settings = dict(_plain(block) or {})
    target = settings.pop("_target_", None)
    if not target:
        raise UserError(f"{key} needs a _target_ naming a peft config class, e.g. _target_: peft.LoraConfig")
    cls = locate(str(target), key)
    if not (isinstance(cls, type) and issubclass(cls, PeftConfig)):
        raise UserError(f"{key}._target_ '{target}' is not a peft config class (a subclass of peft.PeftConfig)")
    settings.setdefault("task_type", "CAUSAL_LM")
    try:
        return cls(**settings)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{key}: {target}: {str(exc).strip().splitlines()[0]}") from exc


def save_adapter(model, path: Path, adapter_name: str = "default") -> None:
    if model.peft_config[adapter_name].is_prompt_learning:
        # PEFT's own state dict holds the encoder's output (for inference): P-tuning's MLP would
        # be lost, so the encoder's parameters are saved as they are, and resume continues them.
        state = model.prompt_encoder[adapter_name].state_dict()
    else:
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_adapter(model, path: Path, adapter_name: str = "default") -> None:
    device = next(model.parameters()).device
    state = load_file(str(path), device=str(device))
    if model.peft_config[adapter_name].is_prompt_learning:
        try:
            model.prompt_encoder[adapter_name].load_state_dict(state)
        except RuntimeError as exc:
            raise UserError(f"adapter file {path} does not match the model ({str(exc).splitlines()[0]}); delete the run directory to start over") from exc
        return
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"adapter file {path} does not match the model (unexpected keys {unexpected[:3]}); delete the run directory to start over")


def lora_layers(model) -> dict[str, torch.nn.Module]:
    """The modules PEFT wrapped with LoRA, by name."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "lora_A") and hasattr(module, "get_base_layer")}


def sum_adapters(model, names: list[str]) -> None:
    """Every named LoRA adapter takes part in the forward pass (their deltas add up), all frozen.

    PEFT's ``set_adapter`` with a list makes every named adapter trainable; the caller then
    unfreezes what it trains.
    """
    model.base_model.set_adapter(names)
    model.requires_grad_(False)


class FoldedLora:
    """The active LoRA adapters folded into the base weights while the model is scored (CPU, fp32).

    An unfolded LoRA layer runs three matrix products (the base weight, A, then B) and adds
    them; folded, one. The folded weights (W + scaling * B A per layer) are built once and
    kept until a weight they came from changes (training steps bump the tensors' version
    counters), so the many scoring jobs of one row share them; entering the context swaps
    them in for the base weights and marks the layers merged, leaving the exit to swap the
    originals back: the base weights themselves are never written. Scores differ from the
    unfolded model's by float rounding only. Not folded: bf16/fp16 weights (the sum would
    round a small delta away), GPU models (the extra products cost little there, and a
    second copy of the weights would), LoRA variants such as DoRA, and non-Linear layers.
    """

    def __init__(self):
        self._key: tuple[list, list] | None = None
        self._folded: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []

    @staticmethod
    def _foldable(model) -> list:
        layers = [m for m in model.modules() if isinstance(m, LoraLinear) and m.active_adapters and not m.merged and not m.disable_adapters]
        for layer in layers:
            weight = layer.get_base_layer().weight
            active = FoldedLora._active(layer)
            if (weight.dtype != torch.float32 or weight.device.type != "cpu" or any(a in layer.lora_variant for a in active)
                    or any(layer.lora_bias.get(a) for a in active)):  # DoRA's and lora_bias's terms are not B·A
                return []
        return layers

    def _build(self, layers: list) -> None:
        folded = []
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight.detach().clone()
                for adapter in self._active(layer):
                    weight += layer.get_delta_weight(adapter)
                folded.append((layer, torch.nn.Parameter(weight, requires_grad=False)))
        self._folded = folded

    @contextlib.contextmanager
    def scoring(self, model) -> Iterator[None]:
        layers = self._foldable(model)
        if not layers:
            yield
            return
        sources = [t for layer in layers for t in self._sources(layer)]
        if not self._current(sources):
            self._build(layers)
            # The tensors themselves, not their ids (a freed adapter's id can come back), and their
            # version counters, which every in-place change (an optimizer step, a copy_) bumps.
            self._key = ([*sources, *(f for _, f in self._folded)], [t._version for t in sources] + [f._version for _, f in self._folded])
        originals = []
        for layer, folded in self._folded:
            base = layer.get_base_layer()
            originals.append((layer, base, base._parameters["weight"]))
            base._parameters["weight"] = folded
            layer.merged_adapters = self._active(layer)  # PEFT's forward: base layer only
        try:
            yield
        finally:
            for layer, base, weight in originals:
                base._parameters["weight"] = weight
                layer.merged_adapters = []

    def _current(self, sources: list[torch.Tensor]) -> bool:
        if self._key is None:
            return False
        tensors, versions = self._key
        now = [*sources, *(f for _, f in self._folded)]
        return len(now) == len(tensors) and all(a is b for a, b in zip(now, tensors)) and [t._version for t in now] == versions

    def invalidate(self) -> None:
        """Forget the folded weights (after something replaced adapter weights without an in-place write)."""
        self._key, self._folded = None, []

    @staticmethod
    def _active(layer) -> list[str]:
        """The layer's active adapters that it holds a LoRA pair for (the ones its forward adds)."""
        return [a for a in layer.active_adapters if a in layer.lora_A]

    @staticmethod
    def _sources(layer) -> list[torch.Tensor]:
        """The tensors a layer's folded weight is computed from (their versions say when to rebuild)."""
        active = FoldedLora._active(layer)
        return [layer.get_base_layer().weight, *(layer.lora_A[a].weight for a in active), *(layer.lora_B[a].weight for a in active)]
