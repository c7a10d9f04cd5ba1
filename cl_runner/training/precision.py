"""Mixed precision: autocast for the compute, fp32 master weights for low-precision trainable weights.

A bf16 weight has 8 bits of mantissa: an Adam update of 1e-5 to a weight of 1.0 is below half
its spacing (2^-8) and rounds away, so full fine-tuning of a bf16 model would silently stop
learning. The optimizer therefore steps fp32 copies of such weights and the model receives
them rounded after every step (the "master weights" of mixed-precision training). fp16
gradients also underflow, which the grad scaler prevents; it unscales the fp32 master
gradients, so it works with fp16 weights too.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class MasterWeights:
    """The parameters the optimizer steps: the trainable ones themselves, or fp32 copies of low-precision ones."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.pairs = [(p, p if p.dtype == torch.float32 else torch.nn.Parameter(p.detach().float().clone())) for p in parameters]
        self.has_copies = any(p is not master for p, master in self.pairs)

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        return [master for _, master in self.pairs]

    @property
    def has_fp16(self) -> bool:
        return any(p.dtype == torch.float16 for p, _ in self.pairs)

    def gradients_to_master(self) -> None:
        """Add the model's low-precision gradients to the fp32 copies' and clear them.

        Called after every micro-batch, so accumulation over an optimizer step sums in fp32.
        """
        for model_param, master in self.pairs:
            if model_param is not master and model_param.grad is not None:
                grad = model_param.grad.float()
                master.grad = grad if master.grad is None else master.grad.add_(grad)
                model_param.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the stepped fp32 copies into the model's weights."""
        for model_param, master in self.pairs:
            if model_param is not master:
                model_param.copy_(master)
