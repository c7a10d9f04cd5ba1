"""Sharded data parallelism (``trainer.sharding=fsdp``): PyTorch's FSDP2 (``fully_shard``) while a task trains.

Replicated data parallelism keeps the whole training state on every rank: for full fine-tuning
of a 7B model that is 14 GB of bf16 weights, 28 GB of fp32 master weights, 56 GB of Adam
moments and the gradients, which no single 80 GB GPU holds. Under FSDP each of N ranks keeps
1/N of the weights, gradients, master weights and optimizer state; a decoder layer's weights
are gathered for its forward and backward and freed again (reduce-scattered gradients).

Only training is sharded. Each task trains a sharded copy of the model, and its trained
weights are gathered back into the runner's model afterwards; every rank then holds the
whole model (as under replicated data parallelism), so evaluation deals tasks out to the
ranks with no collective in a forward pass, and every method hook, checkpoint and editor
sees an ordinary module. What changed the weights between tasks (a method's ``after_task``,
a loaded checkpoint) is what the next task's copy starts from. The price is one whole copy
of the weights per rank besides the shards (14 GB for a 7B model in bf16), against the
56 GB of Adam moments and 28 GB of fp32 master weights that are sharded. The training loop's gradients are sums over the global batch
(the loss is token-weighted over the whole step, see ``loop.step_token_weights``), so FSDP's
reduce-scatter sums instead of averaging.

Constraints, checked with a one-line error: the method must not compute gradients outside
the step (``adjust_gradients``, ``consolidate``: GEM's projection, EWC's Fisher) nor add
loss terms (``extra_loss``), which may read parameters it holds from the runner's model.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod

SHARDINGS = ("none", "fsdp")
# Hooks FSDP training cannot honour: two compute gradients outside the training step (their
# backward would run a reduce-scatter on some ranks only); an extra loss may read parameters the
# method holds from the runner's model, which the sharded copy does not train.
_UNSHARDABLE_HOOKS = ("adjust_gradients", "consolidate", "extra_loss")


def check_sharding(sharding: str, method: ContinualMethod) -> None:
    if sharding not in SHARDINGS:
        raise UserError(f"trainer.sharding '{sharding}' is not one of {list(SHARDINGS)}")
    if sharding == "none":
        return
    for hook in _UNSHARDABLE_HOOKS:
        if getattr(type(method), hook) is not getattr(ContinualMethod, hook):
            raise UserError(f"trainer.sharding=fsdp cannot train method {type(method).__name__} (its {hook} hook is not supported under FSDP); "
                            "use trainer.sharding=none (replicated data parallelism)")


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """The classes a Hugging Face model says must not be split across devices: its decoder layers."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    raise UserError(f"trainer.sharding=fsdp needs a Hugging Face model that names its decoder layers (_no_split_modules); {type(model).__name__} does not")


@contextlib.contextmanager
def sharded_training(model: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]) -> Iterator[tuple[torch.nn.Module, list[torch.nn.Parameter]]]:
    """A sharded copy of ``model`` to train, and ``parameters`` as that copy holds them.

    On exit the trained values are gathered back into ``model``'s own parameters (every rank
    must take part), and the copy with its hooks is dropped: the runner's model never carries
    FSDP's hooks, so scoring, checkpoints and method hooks see an ordinary module.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [p for p in parameters if id(p) not in names]
    if missing:
        raise UserError(f"trainer.sharding=fsdp trains the model's own parameters; the method passed {len(missing)} that are not the model's")
    sharded = copy.deepcopy(model)
    layers = _layer_classes(sharded)
    units = [fully_shard(module) for module in sharded.modules() if type(module).__name__ in layers]
    units.append(fully_shard(sharded))  # the root holds the embeddings, the final norm and the head
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is already weighted over the global batch
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    now = dict(sharded.named_parameters())
    trained = [now[names[id(p)]] for p in parameters]
    yield sharded, trained
    with torch.no_grad():
        for original, shard in zip(parameters, trained):
            original.copy_(shard.full_tensor() if isinstance(shard, DTensor) else shard)


def _shard_like(value: torch.Tensor, sharded: DTensor) -> DTensor:
    """This rank's shard of a whole tensor every rank holds, laid out as ``sharded`` is (no communication)."""
    return distribute_tensor(value.to(sharded.device, sharded.dtype), sharded.device_mesh, sharded.placements, src_data_rank=None)


def whole(value):
    """``value`` with every DTensor gathered into an ordinary tensor (a collective: every rank must call it)."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: whole(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(whole(v) for v in value)
    return value


def reshard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` from whole tensors: each DTensor parameter's state back to its shard."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if not isinstance(parameter, DTensor):
                continue
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and not isinstance(value, DTensor) and value.shape == parameter.shape:
                    state[key] = _shard_like(value, parameter)


def local_numel(parameter: torch.Tensor) -> int:
    """Elements this rank holds of ``parameter``: its shard's under FSDP."""
    return parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``target`` may be a shard and ``value`` the whole tensor."""
    target.copy_(_shard_like(value, target) if isinstance(target, DTensor) else value)
