"""Greedy generation for generation-scored tasks: batched, left-padded, stopped where the answer ends.

A sequence stops at any of the model's EOS ids (``generation_config.eos_token_id`` may be a
list), at the chat template's end-of-turn token, and at the task's ``until`` strings
(lm-evaluation-harness' ``generation_kwargs``); text from an ``until`` string on is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cl_runner.forward import base_model, cache_argument, forward_selected, virtual_prefix_cache, virtual_prefix_kind
from cl_runner.formatting import PromptFormatter
from cl_runner.tasks import Example


def stop_token_ids(model, formatter: PromptFormatter) -> list[int]:
    """Every token id that ends an answer: the model's EOS id(s) and the template's end-of-turn token."""
    ids = set(formatter.end_of_turn_ids())
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def until_stop_token(tokens: list[int], stop_ids: Sequence[int]) -> list[int]:
    """The generated tokens before the first stop token (an EOS id need not be a special token)."""
    stops = set(stop_ids)
    return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    cut = min((text.find(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


def _left_padded(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def generate(model, formatter: PromptFormatter, examples: Sequence[Example], max_new_tokens: int, batch_size: int, device,
             until: Sequence[str] = ()) -> list[str]:
    """Greedy completions of the examples' prompts, batched by length with left padding as decoder-only generation requires."""
    tokenizer = formatter.tokenizer
    until = [until] if isinstance(until, str) else list(until)
    # An over-long prompt is cut exactly as in training: room for max_new_tokens or the target, whichever is longer.
    encoded = [formatter.encode_prompt(e, reserve=max_new_tokens) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: -len(encoded[i]))
    stop_ids = stop_token_ids(model, formatter)
    extra = {"stop_strings": list(until), "tokenizer": tokenizer} if until else {}
    outputs = [""] * len(examples)
    virtual_prefix = virtual_prefix_kind(model) is not None
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id)
        if virtual_prefix:
            generated = _greedy_after_virtual_prefix(model, ids.to(device), mask.to(device), max_new_tokens, stop_ids)
        else:
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, use_cache=True, **extra,
            )[:, ids.shape[1] :]
        for row, index in enumerate(batch):
            text = tokenizer.decode(until_stop_token(generated[row].tolist(), stop_ids), skip_special_tokens=True)
            outputs[index] = cut_at_stop_strings(text, until).strip()
    return outputs


def _greedy_after_virtual_prefix(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_ids: Sequence[int]) -> torch.Tensor:
    """Batched greedy decoding with a KV cache for PEFT prompt, P- and prefix tuning: the new tokens, ``[rows, <= max_new_tokens]``.

    transformers' generate() passes its own cache and so drops a PEFT prefix (the model would
    answer as if untuned). Here the virtual tokens run once as a cache (``virtual_prefix_cache``),
    each left-padded prompt continues it, then one token per step. Rows that stopped keep
    decoding (their tail is cut at the stop token) until every row has stopped.
    """
    cache, length = virtual_prefix_cache(model)
    cache.batch_repeat_interleave(ids.shape[0])
    base, cache_name = base_model(model), cache_argument(model)
    mask = torch.cat([torch.ones((ids.shape[0], length), dtype=mask.dtype, device=mask.device), mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, length:]
    rows = torch.arange(ids.shape[0], device=ids.device)
    stops = torch.tensor(list(stop_ids), device=ids.device)
    new_tokens, done = [], torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    step_ids, cols = ids, torch.full_like(rows, ids.shape[1] - 1)
    for _ in range(max_new_tokens):
        logits = forward_selected(base, step_ids, rows, cols, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_name: cache}).logits
        token = logits.argmax(dim=-1)
        new_tokens.append(token)
        done |= torch.isin(token, stops)
        if bool(done.all()):
            break
        step_ids, cols = token[:, None], torch.zeros_like(rows)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return torch.stack(new_tokens, dim=1) if new_tokens else ids[:, :0]


def _greedy_without_generate(model, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int], device) -> list[int]:
    """Greedy decoding by full forward passes, one example at a time: slower, but it reads the
    logits exactly as choice scoring and training do (the model's own forward, no cache)."""
    ids = torch.tensor([list(prompt)], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        if token in stop_ids:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
    return new
