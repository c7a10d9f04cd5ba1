"""Instruction drift: how far the model moves from its own answers to general instructions.

On held-out open-ended instructions (summaries, explanations, advice: not the sequence's
tasks), the base model's greedy responses are recorded at setup. After each task:

- ``kl``: the mean over the responses' tokens of KL(base || current) between the two models'
  next-token distributions, teacher forced along the base's responses (0 for the base model;
  it grows as each task's style takes over, the design document's picture of a summarising
  instruction slowly answered in the last task's format);
- ``rouge_l``: ROUGE-L of the current model's own greedy responses against the base's (1 for
  the base model).

The base distributions are kept in memory (float32, responses x tokens x vocabulary: about
13 MB per 64-token response for SmolLM2's 49k-token vocabulary, 57 MB for the default six
responses of 48 tokens); on resume they are recorded again from the base model, which greedy
decoding reproduces on the same machine.
"""

from __future__ import annotations

import torch

from cl_runner.evaluation.generation import generate
from cl_runner.evaluation.suites import suite_records
from cl_runner.evaluation.text_metrics import rouge_l
from cl_runner.forward import forward_selected
from cl_runner.layout import pad_right
from cl_runner.tasks import Example

class InstructionDriftSuite:
    headline = "kl"

    def __init__(self, data: str = "builtin", size: int | None = 8, max_new_tokens: int = 48):
        self.examples = suite_records("instruction_drift", data, "drift_instructions.jsonl", lambda r: Example(str(r["instruction"]), ""), size)
        self.max_new_tokens = max_new_tokens
        self.base_responses: list[str] = []
        self.base_log_probs: list[torch.Tensor] = []

    def setup(self, model, formatter, members, device, batch_size: int) -> None:
        """Record the base model's greedy responses and its distributions along them."""
        [member] = members[:1]
        with member():
            self.base_responses = generate(model, formatter, self.examples, self.max_new_tokens, batch_size, device)
            self.base_log_probs = self._log_probs_along_base(model, formatter, batch_size, device)

    def generation_requests(self) -> list[tuple[Example, int]]:
        """The greedy answers ``score`` will ask for (the runner may decode them ahead, with other suites')."""
        return [(e, self.max_new_tokens) for e in self.examples]

    setup_generation_requests = generation_requests  # the base model's responses, recorded once

    def score(self, model, formatter, members, device, batch_size: int) -> dict[str, float]:
        kls, rouges = [], []
        for member in members:
            with member():
                responses = generate(model, formatter, self.examples, self.max_new_tokens, batch_size, device)
                current = self._log_probs_along_base(model, formatter, batch_size, device)
            rouges.append(sum(rouge_l(now, then) for now, then in zip(responses, self.base_responses)) / len(responses))
            kls.append(_mean_kl(self.base_log_probs, current))
        return {"kl": sum(kls) / len(kls), "rouge_l": sum(rouges) / len(rouges)}

    def _log_probs_along_base(self, model, formatter, batch_size: int, device) -> list[torch.Tensor]:
        """Per instruction: [response tokens, vocabulary] log-probabilities, teacher forced on the base's response."""
        sequences = []
        for example, response in zip(self.examples, self.base_responses):
            prompt = formatter.encode_prompt(example, reserve=self.max_new_tokens)
            sequences.append((prompt, formatter.answer_ids(example.prompt, response)))
        out: list[torch.Tensor] = []
        pad = formatter.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                ids, mask = pad_right([p + a for p, a in batch], pad)
                rows = torch.tensor([row for row, (_, a) in enumerate(batch) for _ in a])
                cols = torch.tensor([len(p) - 1 + i for p, a in batch for i in range(len(a))])
                log_probs = forward_selected(model, ids.to(device), rows.to(device), cols.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
                offset = 0
                for _, a in batch:
                    out.append(log_probs[offset : offset + len(a)])
                    offset += len(a)
        return out


def _mean_kl(base: list[torch.Tensor], current: list[torch.Tensor]) -> float:
    """Mean over all response tokens of KL(base || current) = sum_v p_base (log p_base - log p_current)."""
    total, tokens = 0.0, 0
    for then, now in zip(base, current):
        total += float((then.exp() * (then - now)).sum())
        tokens += then.shape[0]
    return total / max(tokens, 1)
