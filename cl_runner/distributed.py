"""Data parallelism under ``torchrun`` (or ``accelerate launch``).

Training: every rank draws the same global micro-batches (``trainer.batch_size`` examples per
rank, so ``batch_size x world`` in all), trains on its share, and the gradients are summed
across ranks before the optimizer step. Because the loss is a token-weighted sum over the whole
optimizer step (loop.step_token_weights), the summed gradient is the one a single process
computes on the whole global batch: N processes at batch size b follow the loss curve of one
process at batch size N*b (up to floating-point summation order). Terms counted once per step
(a method's extra_loss) are divided by the world size, since every rank adds them.

Evaluation: the row's scoring jobs (one per task, the probe, fluency) are dealt out to the
ranks and the answers gathered, so every rank holds the whole row; only rank 0 writes files
and logs (cl_runner.runner).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from cl_runner.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence) -> list:
        """This rank's part of a global micro-batch (strided, so sizes differ by at most one)."""
        return list(items[self.rank :: self.size])

    def device(self, device: torch.device) -> torch.device:
        """Each rank on a machine takes its own GPU (``cuda`` means ``cuda:LOCAL_RANK`` here)."""
        if self.size > 1 and device.type == "cuda":
            if device.index is not None:
                raise UserError(f"trainer.device={device} would put every rank on one GPU; use trainer.device=cuda (each rank takes cuda:LOCAL_RANK)")
            return torch.device("cuda", self.local_rank)
        return device

    def map_shared(self, count: int, compute: Callable[[list[int]], list[T]]) -> list[T]:
        """Items ``0..count-1`` dealt out to the ranks (item i to rank ``i % size``): each rank
        computes its items' answers with ``compute(its indices)``; every rank gets all answers, in order."""
        indices = list(range(self.rank, count, self.size))
        answers = compute(indices)
        if self.size == 1:
            return answers
        gathered: list[dict] = [{} for _ in range(self.size)]
        dist.all_gather_object(gathered, dict(zip(indices, answers)))
        merged = {i: answer for part in gathered for i, answer in part.items()}
        return [merged[i] for i in range(count)]

    def run_shared(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """Each job run on one rank; every rank gets every answer."""
        return self.map_shared(len(jobs), lambda indices: [jobs[i]() for i in indices])

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.size == 1:
            return [value]
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def merge_reports(self, report: dict | None) -> dict | None:
        """A method's row report, merged over the ranks: each rank saw the tasks it scored."""
        reports = [r for r in self.gather(report) if r is not None]
        return _merge_dicts(reports) if reports else None

    def check_same(self, value, what: str) -> None:
        """Refuse to go on if the ranks disagree (their collectives would no longer line up)."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"the ranks disagree on {what}: {values}")


def _merge_dicts(dicts: Sequence[dict]) -> dict:
    merged: dict = {}
    for part in dicts:
        for key, value in part.items():
            merged[key] = _merge_dicts([merged[key], value]) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def current_world(device_name: str = "cpu", timeout_min: float = 120) -> World:
    """The process group torchrun describes in the environment (joined here on first use), or one process.

    ``timeout_min``: how long a rank waits in a collective. The other ranks wait while rank 0
    writes checkpoints and results, and while ranks score unequal shares of a row, so the
    libraries' default (10 minutes for NCCL) is too short for a 7B model's checkpoint."""
    _export_slurm_tasks()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        on_gpu = torch.cuda.is_available() and not str(device_name).startswith("cpu")
        if on_gpu:
            torch.cuda.set_device(local_rank)  # NCCL's collectives (and all_gather_object) use the current device
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=timedelta(minutes=timeout_min))
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def _export_slurm_tasks() -> None:
    """A SLURM job with several tasks (``hydra.launcher.tasks_per_node=N``): submitit starts one process
    per task; the torchrun variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) are derived from SLURM's."""
    if "WORLD_SIZE" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Every task sees the node's GPUs; World.device picks cuda:LOCAL_RANK.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def sum_gradients(parameters: Sequence[torch.nn.Parameter], world: World) -> None:
    """Sum every parameter's gradient over the ranks.

    A parameter no rank computed a gradient for keeps ``grad=None``, so the optimizer skips it
    (no weight decay, no momentum step) as it does in one process; one that only some ranks
    reached gets zeros from the others. One all-reduce per dtype and device over a flat
    buffer: a LoRA model has hundreds of small tensors, and one collective each would cost a
    round trip each.
    """
    if world.size == 1:
        return
    reached = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=_collective_device())
    dist.all_reduce(reached, op=dist.ReduceOp.SUM)
    for parameter, count in zip(parameters, reached.tolist()):
        if count and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    _on_flat_gradients(parameters, lambda flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM))


def broadcast_gradients(parameters: Sequence[torch.nn.Parameter], world: World) -> None:
    """Rank 0's gradients on every rank (after ``sum_gradients`` every rank holds gradients for the same
    parameters): a method that changes the summed gradient from its own per-rank computation (GEM's
    projection) could otherwise differ by rounding between ranks, and the replicas would drift."""
    if world.size == 1:
        return
    _on_flat_gradients(parameters, lambda flat: dist.broadcast(flat, src=0))


def _on_flat_gradients(parameters: Sequence[torch.nn.Parameter], collective: Callable[[torch.Tensor], object]) -> None:
    """Run ``collective`` in place on the gradients that exist, as one flat buffer per dtype and device."""
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for parameter in parameters:
        if parameter.grad is not None:
            groups.setdefault((parameter.grad.dtype, parameter.grad.device), []).append(parameter)
    for members in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        collective(flat)
        offset = 0
        for p in members:
            p.grad.copy_(flat[offset : offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()


def _collective_device() -> str:
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def sum_over_ranks(value: float, world: World) -> float:
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())
