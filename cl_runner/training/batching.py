"""Micro-batches of training examples and their tensors (``trainer.batch_layout``, see cl_runner/layout.py).

- ``padded``: each micro-batch right-padded to its longest example; grouping examples of
  similar length (like ``group_by_length`` in HF Trainer) keeps the padding small.
- ``shared_prefix``: the tokens all examples of the micro-batch start with (chat template,
  system prompt, a task's instruction) run once; the rows continue from their cached keys
  and values, right-padded.
- ``packed``: the micro-batch's examples concatenated into rows of ``trainer.row_tokens``,
  positions restarted and attention kept inside each example: no padding at all.
- ``prefix_tree``: packed, and the tokens that examples share at the start (chat template,
  system prompt, a task's instruction) are computed once per row.
- ``auto``: per micro-batch, whichever of padded, shared_prefix and prefix_tree is estimated
  cheapest (``cheapest_layout``).

The packed layouts pay with attention over the whole row (masked), which grows with the square
of its length; models that cannot take them (see ``supports_tree_layout``) train padded.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from cl_runner.formatting import IGNORE_INDEX, TokenizedExample
from cl_runner.layout import LAYOUTS, build_layout, pad_right


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, window: int = 32) -> list[list[int]]:
    """Shuffle, then sort inside windows of ``window`` batches so each batch holds similar lengths.

    The batch order is shuffled again, so training still sees tasks' examples in random order.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch the way a Hugging Face model takes it: padded positions get attention 0 and label IGNORE_INDEX."""
    input_ids, attention_mask = pad_right([e.input_ids for e in examples], pad_token_id)
    labels, _ = pad_right([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


BATCH_LAYOUTS = LAYOUTS


def training_batch(model, examples: Sequence[TokenizedExample], weights: Sequence[float], pad_token_id: int, layout: str, row_tokens: int) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch plus, for every answer token, where it is read and its loss weight.

    ``weights[i]`` is the weight of each answer token of example i (the training loop sets them
    so that the micro-batches of a step add up to one big batch).
    """
    sequences = [e.input_ids for e in examples]
    targets = [[i for i, label in enumerate(e.labels) if label != IGNORE_INDEX and i > 0] for e in examples]
    laid = build_layout(model, layout, sequences, targets, pad_token_id, row_tokens)
    target_weights = torch.tensor([weights[owner] for owner in laid.owners.tolist()], dtype=torch.float32)
    return {"input_ids": laid.input_ids, **laid.model_inputs, "read_rows": laid.read_rows, "read_cols": laid.read_cols,
            "targets": laid.targets, "target_weights": target_weights}


def input_batches(examples: Sequence[TokenizedExample], batch_size: int, device, prompts_only: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The examples' sequences (prompt and answer, or with ``prompts_only`` the prompt), right-padded, ``batch_size`` at a time, in order."""
    sequences = [e.input_ids[: prompt_length(e)] if prompts_only else e.input_ids for e in examples]
    return padded_batches(sequences, batch_size, device)


def prompt_length(example: TokenizedExample) -> int:
    """Tokens before the answer: the labels are IGNORE_INDEX there."""
    return next((i for i, label in enumerate(example.labels) if label != IGNORE_INDEX), len(example.labels))


def padded_batches(sequences: Sequence[Sequence[int]], batch_size: int, device, pad_token_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[start : start + batch_size], pad_token_id)
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
