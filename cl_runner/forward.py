"""The model's own forward pass, with the vocabulary projection only where logits are read.

Training reads logits at the answer positions, choice scoring at the choice positions: a few
tokens of each sequence, while the LM head (hidden x vocabulary, 49k columns for SmolLM2)
would otherwise run at every position. Rather than calling the decoder and the head
ourselves (which would skip whatever the model or its PEFT wrapper adds: prompt-tuning
virtual tokens, prefix key/values, logit soft-capping or scaling, MoE router losses), we run
the wrapped model's ``forward`` unchanged and put a pre-hook on its output embedding that
hands the head only the selected hidden states. Whatever the model applies after its head
(Gemma 2's ``tanh`` soft-capping, Cohere's ``logit_scale``, Granite's ``logits_scaling``) is
elementwise, so it applies to the selected logits exactly as to the full ones.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from cl_runner.errors import UserError
from transformers import DynamicCache


@dataclass
class SelectedForward:
    """``logits[n]`` is the model's output at ``(rows[n], cols[n])`` of the input; ``hidden`` the last hidden states."""

    logits: torch.Tensor  # [N, vocab]
    hidden: torch.Tensor | None  # [batch, length, hidden], aligned with input_ids (virtual tokens dropped)
    outputs: object  # the model's own output object (aux_loss, past_key_values, ...)


def is_prompt_learning(model) -> bool:
    """PEFT prompt learning (prompt tuning, P-tuning, prefix tuning, ...) with its adapter on: virtual tokens before every row."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False)) and not getattr(model, "_adapters_disabled", False)


# Prompt-learning kinds whose virtual tokens are the same for every row, so they can run once as a
# KV cache that packed or prefix-sharing rows continue (others, e.g. CPT, keep padded rows).
VIRTUAL_PREFIX_KINDS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


def virtual_prefix_kind(model) -> str | None:
    """The PEFT type of ``model``'s virtual tokens when they can run as a shared KV cache; None otherwise."""
    if not is_prompt_learning(model):
        return None
    kind = str(model.active_peft_config.peft_type).rsplit(".", 1)[-1]
    return kind if kind in VIRTUAL_PREFIX_KINDS else None


def virtual_prefix_cache(model) -> tuple[DynamicCache, int]:
    """PEFT's virtual tokens run once, as a one-row KV cache of their length (gradients flow through it).

    This is what PEFT's own forward computes before each row: prefix tuning hands its prompt to
    the model as a KV cache; prompt tuning and P-tuning prepend embeddings, whose keys and values
    are the same for every row because nothing before them differs.
    """
    config = model.active_peft_config
    length = config.num_virtual_tokens
    if virtual_prefix_kind(model) == "PREFIX_TUNING":
        return model.get_prompt(batch_size=1, max_cache_len=length), length
    cache = DynamicCache(config=base_model(model).config)
    embeddings = model.get_prompt(batch_size=1).to(model.word_embeddings.weight.dtype)
    base_model(model)(inputs_embeds=embeddings, use_cache=True, **{cache_argument(model): cache})
    return cache, length


def _after_virtual_prefix(inputs: dict, length: int) -> dict:
    """Row inputs moved past ``length`` cached virtual tokens: positions shifted, every key may see them."""
    shifted = dict(inputs)
    shifted["position_ids"] = inputs["position_ids"] + length
    mask = inputs.get("attention_mask")
    if mask is not None:
        # 2-D: [rows, keys]; 4-D: [rows, 1, queries, keys], boolean (True = attend) or additive (0 = attend).
        visible = torch.ones if mask.dtype in (torch.bool, torch.long, torch.int) else torch.zeros
        shifted["attention_mask"] = torch.cat([visible((*mask.shape[:-1], length), dtype=mask.dtype, device=mask.device), mask], dim=-1)
    return shifted


def base_model(model) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (the model itself when unwrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model) -> torch.nn.Module | None:
    """The module that maps hidden states to vocabulary logits, looked up through PEFT wrappers."""
    getter = getattr(base_model(model), "get_output_embeddings", None)
    return getter() if getter is not None else None


def cache_argument(model) -> str:
    """The name under which this transformers version's forward takes a KV cache."""
    return "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"


def forward_selected(model, input_ids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, prefix_ids: torch.Tensor | None = None,
                     **inputs) -> SelectedForward:
    """Run ``model(input_ids=..., **inputs)`` and return its logits at the positions ``(rows, cols)`` only.

    ``rows``/``cols`` index ``input_ids``. Models that prepend virtual tokens (PEFT prompt
    tuning, P-tuning) see a longer sequence than ``input_ids``; they are prepended on the
    left, so the offset is the difference in length. A model without a separate head
    module falls back to its full logits, gathered at the same positions.

    ``prefix_ids`` ([1, P]): tokens that every row continues. They run once, and their keys and
    values are shared by all rows (gradients flow through them); ``inputs`` then hold the
    ``[rows, P + length]`` attention mask and the rows' position ids, which start at P.
    PEFT virtual tokens, when the layout gives position ids, run once the same way, before the
    prefix (``virtual_prefix_cache``); masks and positions are shifted past them here.
    """
    cache_name, cache = cache_argument(model), None
    if "position_ids" in inputs and virtual_prefix_kind(model) is not None:
        # A packed or prefix-sharing layout: PEFT's forward would drop its positions (prompt tuning)
        # or not know its mask, so its virtual tokens run here and the base model continues them.
        cache, length = virtual_prefix_cache(model)
        model, inputs = base_model(model), _after_virtual_prefix(inputs, length)
    if prefix_ids is not None:
        empty = torch.zeros(0, dtype=torch.long, device=input_ids.device)
        cache = cache if cache is not None else DynamicCache(config=model.config)  # filled in place by the prefix's forward
        forward_selected(model, prefix_ids, empty, empty, **{cache_name: cache}, use_cache=True)
    if cache is not None:
        cache.batch_repeat_interleave(input_ids.shape[0])
        inputs = {**inputs, cache_name: cache, "use_cache": True}
    head = output_head(model)
    captured: dict[str, torch.Tensor | int] = {"calls": 0}

    def select_hidden(module, args, kwargs):
        captured["calls"] += 1
        hidden = args[0] if args else kwargs.get("input")
        offset = hidden.shape[1] - input_ids.shape[1] if hidden is not None and hidden.dim() == 3 else -1
        if captured["calls"] > 1 or offset < 0 or hidden.shape[0] != input_ids.shape[0]:
            return None  # not the plain [batch, length, hidden] call we expect: leave it alone (checked below)
        hidden = hidden[:, offset:]
        captured["hidden"] = hidden
        # [1, N, H] keeps the 3-D shape the model's post-processing expects.
        selected = hidden[rows, cols].unsqueeze(0)
        return ((selected, *args[1:]), kwargs) if args else (args, {**kwargs, "input": selected})

    handle = head.register_forward_pre_hook(select_hidden, with_kwargs=True) if head is not None else None
    try:
        outputs = model(input_ids=input_ids, **inputs)
    finally:
        if handle is not None:
            handle.remove()
    if captured["calls"] > 1:
        raise RuntimeError("the model's output head ran more than once in one forward pass; cl-runner cannot tell which logits to read")
    if "hidden" in captured:
        return SelectedForward(outputs.logits[0], captured["hidden"], outputs)
    logits = outputs.logits[:, outputs.logits.shape[1] - input_ids.shape[1] :]
    return SelectedForward(logits[rows, cols], None, outputs)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (each with ``self_attn`` and ``mlp``)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(m, "self_attn") and hasattr(m, "mlp") for m in module):
            return module
    raise UserError("this method needs decoder layers with self_attn and mlp submodules (LLaMA, Qwen, Mistral, Gemma, ...)")
