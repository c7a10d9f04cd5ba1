"""Greedy generation for generation-scored tasks: batched, left-padded, stopped where the answer ends.

A sequence stops at any of the model's EOS ids (``generation_config.eos_token_id`` may be a
list), at the chat template's end-of-turn token, and at the task's ``until`` strings
(lm-evaluation-harness' ``generation_kwargs``); text from an ``until`` string on is dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar

import torch
from transformers import DynamicCache

from cl_runner.forward import base_model, cache_argument, forward_selected, virtual_prefix_cache, virtual_prefix_kind
from cl_runner.layout import supports_shared_prefix, takes_custom_layouts
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
    prefetched = _PREFETCHED.get()
    if prefetched is not None and all((tuple(e), max_new_tokens) in prefetched for e in encoded):
        for index, prompt in enumerate(encoded):
            text = tokenizer.decode(until_stop_token(prefetched[tuple(prompt), max_new_tokens], stop_ids), skip_special_tokens=True)
            outputs[index] = cut_at_stop_strings(text, until).strip()
        return outputs
    virtual_prefix = virtual_prefix_kind(model) is not None
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = _left_padded([encoded[i] for i in batch], tokenizer.pad_token_id)
        if virtual_prefix:
            generated = greedy_cached(model, ids.to(device), mask.to(device), [max_new_tokens] * len(batch), stop_ids)
        else:
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids, use_cache=True,
                synced_gpus=False,  # each rank decodes its own prompts (an FSDP model is whole between tasks; transformers would wait for the other ranks)
                **extra,
            )[:, ids.shape[1] :].tolist()
        for row, index in enumerate(batch):
            text = tokenizer.decode(until_stop_token(generated[row], stop_ids), skip_special_tokens=True)
            outputs[index] = cut_at_stop_strings(text, until).strip()
    return outputs


def greedy_cached(model, ids: torch.Tensor, mask: torch.Tensor, budgets: Sequence[int], stop_ids: Sequence[int],
                  prefix: Sequence[int] = ()) -> list[list[int]]:
    """Batched greedy decoding with a KV cache: row ``r``'s new tokens, up to its first stop token or ``budgets[r]`` of them.

    Rows with different budgets share a batch (the fixed cost of a decoding step is paid once
    for all), which transformers' generate() cannot do; a row that is done leaves the batch and
    its cache, so it costs nothing after. PEFT prompt, P- and prefix tuning run their virtual
    tokens once as a cache first (``virtual_prefix_cache``): generate() passes its own cache
    and would drop a PEFT prefix. ``prefix``: tokens every row starts with (the chat template
    and system prompt), run once for all rows; ``ids`` then hold the rest of each prompt.
    """
    cache_name = cache_argument(model)
    if virtual_prefix_kind(model) is not None:
        cache, length = virtual_prefix_cache(model)
        model = base_model(model)
    else:
        cache, length = DynamicCache(config=base_model(model).config), 0
    if len(prefix):
        shared = torch.tensor([list(prefix)], device=ids.device)
        positions = torch.arange(length, length + shared.shape[1], device=ids.device)[None]
        nothing = torch.zeros(0, dtype=torch.long, device=ids.device)  # no logits are read from the prefix
        forward_selected(model, shared, nothing, nothing, attention_mask=torch.ones((1, length + shared.shape[1]), dtype=mask.dtype, device=ids.device),
                         position_ids=positions, use_cache=True, **{cache_name: cache})
        length += shared.shape[1]
    if length:
        cache.batch_repeat_interleave(ids.shape[0])
    mask = torch.cat([torch.ones((ids.shape[0], length), dtype=mask.dtype, device=mask.device), mask], dim=1)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, length:]
    stops = torch.tensor(list(stop_ids), device=ids.device)
    budgets = torch.tensor(list(budgets), device=ids.device)
    new_tokens: list[list[int]] = [[] for _ in range(ids.shape[0])]
    alive = (budgets > 0).nonzero().squeeze(1)  # rows still decoding, as indices into the batch
    if len(alive) < ids.shape[0]:
        ids, mask, positions = ids[alive], mask[alive], positions[alive]
    if len(alive) and len(alive) < len(budgets) and length:
        cache.batch_select_indices(alive)
    step_ids, cols = ids, torch.full_like(alive, ids.shape[1] - 1)
    for step in range(int(budgets.max()) if len(budgets) else 0):
        if not len(alive):
            break
        rows = torch.arange(len(alive), device=ids.device)
        token = forward_selected(model, step_ids, rows, cols, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_name: cache}).logits.argmax(dim=-1)
        for row, value in zip(alive.tolist(), token.tolist()):
            new_tokens[row].append(value)
        going = ~(torch.isin(token, stops) | (budgets[alive] <= step + 1))
        if not bool(going.all()):
            kept = going.nonzero().squeeze(1)
            alive, token, mask, positions = alive[kept], token[kept], mask[kept], positions[kept]
            if len(alive):
                cache.batch_select_indices(kept)
        step_ids, cols = token[:, None], torch.zeros_like(alive)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
    return new_tokens


# Replies decoded ahead, {(prompt token ids, max_new_tokens): new token ids}: generate() reads them.
_PREFETCHED: ContextVar[dict | None] = ContextVar("prefetched_generations", default=None)


def decode_ahead(model, formatter: PromptFormatter, requests: Sequence[tuple[Example, int]], batch_size: int, device, skip: Mapping = {}) -> dict:  # noqa: B006
    """Greedy replies to every ``(example, max_new_tokens)`` request, decoded in shared batches (longest budgets first).

    An evaluation row asks for greedy answers from several suites and the probe, each with a
    few prompts and its own length. Decoded together, the row takes as many decoding steps as
    its longest answer per batch instead of the sum over the suites. Hand the result to
    ``use_decoded`` and generate() reads it. Empty for models whose forward does not take
    explicit positions and a KV cache (``takes_custom_layouts``): they decode per call.
    Requests already in ``skip`` (answers decoded before, with the same weights) are left out.
    """
    encoded = [key for key in dict.fromkeys((tuple(formatter.encode_prompt(e, reserve=n)), n) for e, n in requests) if key not in skip]
    if not encoded or not takes_custom_layouts(model, max(len(p) + n for p, n in encoded)):
        return {}
    stop_ids = stop_token_ids(model, formatter)
    encoded.sort(key=lambda item: (-item[1], -len(item[0])))
    replies = {}
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            # The tokens every prompt of the batch starts with (template, system prompt) run once.
            shared = _common_prefix([p for p, _ in batch]) if supports_shared_prefix(model, max(len(p) + n for p, n in batch)) else 0
            ids, mask = _left_padded([p[shared:] for p, _ in batch], formatter.tokenizer.pad_token_id)
            generated = greedy_cached(model, ids.to(device), mask.to(device), [n for _, n in batch], stop_ids, batch[0][0][:shared])
            replies.update(zip(batch, generated))
    return replies


def _common_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all prompts share, leaving each at least one of its own (which predicts its first answer token)."""
    shared = 0
    limit = min(len(p) for p in prompts) - 1
    while shared < limit and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return shared if len(prompts) > 1 else 0


@contextlib.contextmanager
def use_decoded(replies: dict) -> Iterator[None]:
    """Inside the block, generate() answers from ``replies`` (``decode_ahead``) where it holds every prompt asked."""
    token = _PREFETCHED.set(replies or None)
    try:
        yield
    finally:
        _PREFETCHED.reset(token)


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
