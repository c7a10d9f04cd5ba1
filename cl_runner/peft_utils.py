"""Small helpers shared by the LoRA-based methods: build configs, save and load adapters."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from cl_runner.errors import UserError


def lora_config(settings) -> LoraConfig:
    """A causal-LM LoraConfig from the method YAML's ``lora:`` block; a bad setting is a one-line UserError."""
    settings = dict(settings)
    if not isinstance(settings.get("target_modules"), (str, type(None))):
        settings["target_modules"] = list(settings["target_modules"])
    try:
        return LoraConfig(task_type="CAUSAL_LM", **settings)
    except (TypeError, ValueError) as exc:
        raise UserError(f"method.lora: {str(exc).strip().splitlines()[0]}") from exc


def save_adapter(model, path: Path, adapter_name: str = "default") -> None:
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))


def load_adapter(model, path: Path, adapter_name: str = "default") -> None:
    device = next(model.parameters()).device
    state = load_file(str(path), device=str(device))
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"adapter file {path} does not match the model (unexpected keys {unexpected[:3]}); delete the run directory to start over")


def trainable_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
