"""Small helpers shared by the PEFT-based methods: build configs from YAML, save and load adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from peft import PeftConfig, get_peft_model_state_dict, set_peft_model_state_dict
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
