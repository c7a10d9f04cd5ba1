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
56 GB of Adam moments and 28 GB of fp32 master weights that are sharded. The training loop's
gradients are sums over the global batch (the loss is token-weighted over the whole step, see
``loop.step_token_weights``), so FSDP's reduce-scatter sums instead of averaging, in fp32
whatever the weights' precision.

Constraints, checked with a one-line error: the method must not compute gradients outside
the step (``adjust_gradients``, ``consolidate``: GEM's projection, EWC's Fisher) nor add
loss terms (``extra_loss``), which may read parameters it holds from the runner's model; no
fp16 (the grad scaler would skip steps on some ranks only); no module reachable from two
places (Houlsby's adapters hang under their layer and under the model); torch >= 2.8.
FSDP is imported only when a run asks for it.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator, Sequence

import torch

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod

SHARDINGS = ("none", "fsdp")
# Hooks FSDP training cannot honour: two compute gradients outside the training step (their
# backward would run a reduce-scatter on some ranks only); an extra loss may read parameters the
# method holds from the runner's model, which the sharded copy does not train.
_UNSHARDABLE_HOOKS = ("adjust_gradients", "consolidate", "extra_loss")


def check_sharding(sharding: str, method: ContinualMethod, precision: str) -> None:
    """Refuse, before anything is loaded, what trainer.sharding=fsdp cannot train."""
    if sharding not in SHARDINGS:
        raise UserError(f"trainer.sharding '{sharding}' is not one of {list(SHARDINGS)}")
    if sharding == "none":
        return
    for hook in _UNSHARDABLE_HOOKS:
        if getattr(type(method), hook) is not getattr(ContinualMethod, hook):
            raise UserError(f"trainer.sharding=fsdp cannot train method {type(method).__name__} (its {hook} hook is not supported under FSDP); "
                            "use trainer.sharding=none (replicated data parallelism)")
    if precision == "fp16":
        raise UserError("trainer.sharding=fsdp cannot train in fp16 (the grad scaler would skip a step on some ranks only); use trainer.precision=bf16")
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None
    if FSDPModule is None or not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise UserError(f"trainer.sharding=fsdp needs torch >= 2.8 (FSDP2 with summed gradients); this is torch {torch.__version__}")


def check_shardable(model: torch.nn.Module) -> None:
    """A module reachable from two places would be sharded twice (FSDP refuses it mid-run): say so at setup."""
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in seen and seen[id(module)] != name and list(module.parameters(recurse=False)):
            raise UserError(f"trainer.sharding=fsdp cannot shard this model: module {seen[id(module)]} is also {name} "
                            "(a method that hangs its modules in two places); use trainer.sharding=none")
        seen.setdefault(id(module), name)


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
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    names = {id(p): name for name, p in model.named_parameters()}
    missing = [p for p in parameters if id(p) not in names]
    if missing:
        raise UserError(f"trainer.sharding=fsdp trains the model's own parameters; the method passed {len(missing)} that are not the model's")
    sharded = copy.deepcopy(model)
    layers = _layer_classes(sharded)
    # Gradients are reduced in fp32 (bf16 weights' gradients too), as replicated training sums its fp32 master gradients.
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    units = [fully_shard(module, mp_policy=policy) for module in sharded.modules() if type(module).__name__ in layers]
    units.append(fully_shard(sharded, mp_policy=policy))  # the root holds the embeddings, the final norm and the head
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum over ranks: the loss is already weighted over the global batch
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    now = dict(sharded.named_parameters())
    trained = [now[names[id(p)]] for p in parameters]
    yield sharded, trained
    with torch.no_grad():
        for original, shard in zip(parameters, trained):
            original.copy_(gather_full(shard))


def is_sharded(value) -> bool:
    """A DTensor (only a sharded run makes them; torch.distributed.tensor is not imported otherwise)."""
    tensor_module = sys.modules.get("torch.distributed.tensor")
    return tensor_module is not None and isinstance(value, tensor_module.DTensor)


def _shard_like(value: torch.Tensor, sharded) -> torch.Tensor:
    """This rank's shard of a whole tensor every rank holds, laid out as ``sharded`` is (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(sharded.device, sharded.dtype), sharded.device_mesh, sharded.placements, src_data_rank=None)


def gather_full(value, keep: bool = True, to_cpu: bool = False):
    """``value`` with every DTensor gathered into an ordinary tensor, one tensor at a time (a collective:
    every rank must call it). ``to_cpu`` moves each gathered tensor off the device at once (a
    checkpoint of a 7B model's Adam moments would not fit on one GPU whole); ``keep=False`` takes
    part in the collectives and keeps nothing (the ranks that do not write)."""
    if is_sharded(value):
        whole = value.full_tensor()
        return (whole.cpu() if to_cpu else whole) if keep else None
    if isinstance(value, dict):
        return {k: gather_full(v, keep, to_cpu) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gather_full(v, keep, to_cpu) for v in value)
    if isinstance(value, torch.Tensor) and to_cpu and keep:
        return value.cpu()
    return value


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state (whole tensors) with each sharded parameter's moments cut to this rank's
    shard, one tensor at a time, before ``load_state_dict`` would put them whole on the device."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    per_parameter = {}
    for index, values in state["state"].items():
        parameter = parameters[int(index)]
        per_parameter[index] = {k: _shard_like(v, parameter) if is_sharded(parameter) and isinstance(v, torch.Tensor) and v.shape == parameter.shape else v
                                for k, v in values.items()}
    return {**state, "state": per_parameter}


def local_numel(parameter: torch.Tensor) -> int:
    """Elements this rank holds of ``parameter``: its shard's under FSDP."""
    return parameter.to_local().numel() if is_sharded(parameter) else parameter.numel()


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` where ``target`` may be a shard and ``value`` the whole tensor."""
    target.copy_(_shard_like(value, target) if is_sharded(target) else value)
