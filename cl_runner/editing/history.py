"""Exact weight deltas of applied tasks, so any task can be rolled back.

``after - before`` computed in the weight's dtype is exact for most elements (Sterbenz: the two
are within a factor of two of each other), but not for all, so each record also keeps the
``before`` value of every element where ``after - delta`` would not give ``before`` back. Rolling
back the last change to a weight is then bit for bit. Rolling back an earlier task whose
weights a later task changed again subtracts its delta (the later tasks' changes stay): the
weights are then what the later tasks made of them, less this task's delta, which is as close
as the history can get and is logged as such.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

log = logging.getLogger(__name__)


@dataclass
class WeightChange:
    delta: torch.Tensor
    patch_index: torch.Tensor  # flat indices where after - delta != before
    patch_value: torch.Tensor  # before's values there
    after_digest: str  # sha256 of the weight's bytes after the change: tells whether it changed since


def digest(weight: torch.Tensor) -> str:
    return hashlib.sha256(weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def record_change(before: torch.Tensor, after: torch.Tensor) -> WeightChange:
    before, after = before.detach(), after.detach()
    delta = after - before
    wrong = ((after - delta) != before).reshape(-1).nonzero().squeeze(1)
    return WeightChange(delta.cpu(), wrong.cpu(), before.reshape(-1)[wrong].cpu(), digest(after))


class EditHistory:
    """Per task name, the exact change it made to each weight it touched."""

    def __init__(self) -> None:
        self.changes: dict[str, dict[str, WeightChange]] = {}

    def snapshot(self, model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: model.get_parameter(n).detach().clone() for n in names}

    def record(self, task: str, model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
        """Record what ``task`` changed: ``before`` holds the weights (by name) as they were before it."""
        self.changes[task] = {n: record_change(w, model.get_parameter(n)) for n, w in before.items()}

    def rollback(self, task: str, model: torch.nn.Module) -> bool:
        """Undo ``task``'s changes; True when every weight is restored bit for bit (nothing changed it since)."""
        if task not in self.changes:
            raise KeyError(task)
        exact = True
        with torch.no_grad():
            for name, change in self.changes.pop(task).items():
                weight = model.get_parameter(name)
                unchanged_since = digest(weight) == change.after_digest
                weight.sub_(change.delta.to(weight.device, weight.dtype))
                if unchanged_since:
                    weight.view(-1)[change.patch_index.to(weight.device)] = change.patch_value.to(weight.device, weight.dtype)
                else:
                    exact = False
                    log.warning("rollback of %s: %s was changed by a later task; subtracted this task's delta only", task, name)
        return exact

    def save(self, directory: Path, task: str) -> None:
        tensors, metadata = {}, {}
        for name, change in self.changes[task].items():
            tensors[f"{name}::delta"] = change.delta.contiguous()
            tensors[f"{name}::patch_index"] = change.patch_index.contiguous()
            tensors[f"{name}::patch_value"] = change.patch_value.contiguous()
            metadata[name] = change.after_digest
        safetensors.torch.save_file(tensors, str(directory / "edit_history.safetensors"), metadata={"task": task, **metadata})

    def load(self, directory: Path) -> None:
        path = directory / "edit_history.safetensors"
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            task = metadata.pop("task")
            self.changes[task] = {
                name: WeightChange(handle.get_tensor(f"{name}::delta"), handle.get_tensor(f"{name}::patch_index"),
                                   handle.get_tensor(f"{name}::patch_value"), checksum)
                for name, checksum in metadata.items()
            }
