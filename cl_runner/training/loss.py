"""The training objective: next-token cross-entropy on the answer tokens, through the model's own forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cl_runner.formatting import IGNORE_INDEX
from cl_runner.forward import forward_selected

MODEL_INPUTS = ("attention_mask", "position_ids", "prefix_ids")


@dataclass
class LossOutput:
    """What ``extra_loss`` receives, and what the training loop weighs into the step's objective.

    ``loss`` is the number ``model(**batch).loss`` would give (mean answer-token cross-entropy,
    plus the model's own auxiliary loss, e.g. an MoE router's); ``token_losses`` the
    cross-entropy of each answer token, in the order of ``batch["targets"]``, and ``logits`` the
    logits it was computed from (fp32);
    ``last_hidden_state`` the decoder's output aligned with ``input_ids`` (in a packed batch,
    rows hold several examples; with a shared prefix, rows hold only what follows it: read
    it through ``read_rows``/``read_cols``).
    """

    loss: torch.Tensor
    token_losses: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor | None
    last_hidden_state: torch.Tensor | None


def model_aux_loss(model, outputs) -> torch.Tensor | None:
    """The auxiliary loss a model adds to its own loss when given labels (MoE load balancing), if any."""
    aux = getattr(outputs, "aux_loss", None)
    coefficient = getattr(model.config, "router_aux_loss_coef", None)
    if aux is None or coefficient is None:
        return None
    return coefficient * aux


def read_spec(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each answer token's logits are read, and the token: from a training batch, or shifted ``labels``."""
    if "targets" in batch:
        return batch["read_rows"], batch["read_cols"], batch["targets"]
    shifted = batch["labels"][:, 1:]
    rows, cols = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, shifted[rows, cols]


def answer_token_loss(model, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Next-token cross-entropy at the answer positions, through ``model``'s own forward.

    ``batch`` is a training batch (``training_batch``) or a Hugging Face style one with
    ``labels``. The vocabulary projection runs only at the answer positions (see
    cl_runner/forward.py): for short answers after long prompts, every continual-learning task
    here, that skips most of the LM head's compute, forward and backward.
    """
    rows, cols, targets = read_spec(batch)
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    selected = forward_selected(model, batch["input_ids"], rows, cols, **inputs)
    logits = selected.logits.float()
    token_losses = F.cross_entropy(logits, targets, reduction="none")
    aux = model_aux_loss(model, selected.outputs)
    loss = token_losses.mean() if aux is None else token_losses.mean() + aux
    return LossOutput(loss, token_losses, logits, aux, selected.hidden)


def weighted_objective(outputs: LossOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """This micro-batch's share of the optimizer step's loss: the answer-token losses weighted by ``target_weights``."""
    return (outputs.token_losses * batch["target_weights"].to(outputs.token_losses.device)).sum()
