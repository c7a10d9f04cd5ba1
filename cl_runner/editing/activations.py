"""Token positions of a subject in a prompt, and a module's input and output read at chosen positions.

Editors feed raw text (no chat template): a fact is completed, not answered. The key of a fact
is read at the subject's last token: the prompt's tokens up to and including the subject are
tokenised alone and the last of them is the position (as ROME does), so the position is right
whatever the tokenizer does with the leading space.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from cl_runner.forward import forward_selected
from cl_runner.layout import pad_right


@dataclass(frozen=True)
class SubjectPrompt:
    """A tokenised prompt and the position of its subject's last token."""

    input_ids: list[int]
    subject_last: int


def encode_subject_prompt(tokenizer, prompt: str, subject: str, context: str = "{}") -> SubjectPrompt:
    """``context`` with ``prompt`` put at its ``{}``, and ``subject`` at the prompt's ``{}``."""
    text = context.replace("{}", prompt)
    cut = text.index("{}")
    full = text[:cut] + subject + text[cut + 2 :]
    ids = tokenizer(full)["input_ids"]
    through_subject = tokenizer(text[:cut] + subject)["input_ids"]
    return SubjectPrompt(ids, min(len(through_subject), len(ids)) - 1)


def target_ids(tokenizer, target: str) -> list[int]:
    """The target's tokens as they follow a prompt: with a leading space, without special tokens."""
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    # SentencePiece tokenizers (Llama-2) may give the space a token of its own: not part of the answer.
    if len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
        ids = ids[1:]
    return ids


def right_padded(sequences: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = pad_right(sequences, pad_id)
    return ids.to(device), mask.to(device)


@contextlib.contextmanager
def reading(module: torch.nn.Module) -> Iterator[dict]:
    """While open, ``seen["input"]`` / ``seen["output"]`` hold the module's last input and output."""
    seen: dict = {}

    def hook(_module, args, output):
        seen["input"] = args[0]
        seen["output"] = output[0] if isinstance(output, tuple) else output

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


@contextlib.contextmanager
def adding_at(module: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, vector: torch.Tensor) -> Iterator[None]:
    """While open, ``vector`` is added to the module's output at each ``(rows[n], cols[n])``."""

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # older decoder layers return (hidden, ...)
        hidden = hidden.clone()
        hidden[rows, cols] = hidden[rows, cols] + vector.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def io_at(model, module: torch.nn.Module, prompts: Sequence[SubjectPrompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's input and output (float32) at each prompt's subject-last position: ``(n, in)``, ``(n, out)``."""
    device = next(model.parameters()).device
    ids, mask = right_padded([p.input_ids for p in prompts], pad_id, device)
    rows = torch.arange(len(prompts), device=device)
    cols = torch.tensor([p.subject_last for p in prompts], device=device)
    nothing = torch.zeros(0, dtype=torch.long, device=device)
    with reading(module) as seen:
        forward_selected(model, ids, nothing, nothing, attention_mask=mask)  # no logits are read: the head runs on no position
    return seen["input"][rows, cols].float(), seen["output"][rows, cols].float()
