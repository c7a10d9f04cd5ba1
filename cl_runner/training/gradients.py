"""Gradients of other examples' loss, for methods that compare or weigh gradients (EWC, GEM, A-GEM).

The probe runs the model's own forward in eval mode (no dropout, so it draws no random
numbers and a resumed run stays on the uninterrupted one's path) and returns gradients
without touching ``.grad``, which holds the optimizer step being built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from cl_runner.formatting import TokenizedExample
from cl_runner.training.batching import training_batch
from cl_runner.training.loss import answer_token_loss, weighted_objective
from cl_runner.training.precision import autocast_context


class GradientProbe:
    """Gradients of the answer-token loss with respect to ``parameters`` (returned in fp32, in their order)."""

    def __init__(self, model, parameters: Sequence[torch.nn.Parameter], pad_token_id: int, device, precision: str = "fp32",
                 batch_size: int = 8, layout: str = "padded", row_tokens: int = 1024):
        self.model, self.parameters = model, list(parameters)
        self.pad_token_id, self.device, self.precision = pad_token_id, torch.device(device), precision
        self.batch_size, self.layout, self.row_tokens = batch_size, layout, row_tokens

    def of(self, examples: Sequence[TokenizedExample]) -> list[torch.Tensor]:
        """The gradient of the mean answer-token cross-entropy over ``examples`` (one batch of them all)."""
        total = sum(e.num_target_tokens for e in examples)
        summed = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.parameters]
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            for acc, grad in zip(summed, self._gradient(chunk, 1.0 / max(total, 1), None)):
                acc.add_(grad)
        return summed

    def per_batch(self, examples: Sequence[TokenizedExample], batch_size: int, sample_from: torch.Generator | None = None,
                  summed: bool = False) -> Iterator[list[torch.Tensor]]:
        """The gradient of each batch of ``batch_size`` examples' mean answer-token loss (1: per example);
        with ``summed``, of their summed answer-token loss (the negative log-likelihood of the answers).

        With ``sample_from`` (a seeded generator, so the global random stream is untouched) the
        targets are drawn from the model's own next-token distribution instead of taken from
        the data: the true Fisher's expectation, one sample per token.
        """
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            tokens = sum(e.num_target_tokens for e in chunk)
            yield self._gradient(chunk, 1.0 if summed else 1.0 / max(tokens, 1), sample_from)

    def _gradient(self, examples: Sequence[TokenizedExample], token_weight: float, sample_from: torch.Generator | None) -> list[torch.Tensor]:
        batch = training_batch(self.model, examples, [token_weight] * len(examples), self.pad_token_id, self.layout, self.row_tokens)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.enable_grad(), autocast_context(self.precision, self.device):
                outputs = answer_token_loss(self.model, batch)  # the training objective's own forward
                if sample_from is not None:
                    probabilities = torch.softmax(outputs.logits.detach(), dim=-1).to(sample_from.device)
                    drawn = torch.multinomial(probabilities, 1, generator=sample_from).squeeze(-1).to(outputs.logits.device)
                    outputs.token_losses = F.cross_entropy(outputs.logits, drawn, reduction="none")
                loss = weighted_objective(outputs, batch)
                grads = torch.autograd.grad(loss, self.parameters, allow_unused=True)
        finally:
            self.model.train(was_training)
        return [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if g is None else g.float() for p, g in zip(self.parameters, grads)]
