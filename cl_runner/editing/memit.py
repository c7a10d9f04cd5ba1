"""MEMIT (Meng et al., ICLR 2023) and AlphaEdit (Fang et al., ICLR 2025): a batch of facts spread
over several layers' MLP output projections.

For requests i = 1..n and edited layers l_1 < .. < l_k:

1. z_i: the residual stream (decoder-layer output) of the last edited layer l_k at request i's
   last subject token, plus a delta optimised exactly as ROME's v* (``rome.fit_value``: NLL of
   the new target over the context templates, KL on ``"{s} is a"``, weight decay, clamp).
2. For each layer l in ascending order, with the updates of earlier layers already applied:
   K = the layer's MLP-output-projection input at each request's last subject token, averaged
   within each group of templates and then over the groups (columns); R = z - the current l_k output on the bare prompts, spread
   as R / (layers left); MEMIT: dW = R (lambda C + K K^T)^-1 K ^T with lambda =
   ``mom2_update_weight`` (in float64).
   AlphaEdit: P projects onto the directions of C whose singular values are below
   ``nullspace_threshold`` (the preserved keys' null space) and dW^T = (P (K K^T + K_p K_p^T)
   + ``l2`` I)^-1 P K R^T, where K_p K_p^T (``cache``) accumulates the keys of earlier batches
   of this run: edits of one run never leak into another's cache (EasyEdit #613).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cl_runner.editing.activations import encode_subject_prompt, io_at
from cl_runner.editing.layout import ModuleTemplates, outer_update
from cl_runner.editing.requests import EditRequest
from cl_runner.editing.rome import RomeSettings, fit_value
from cl_runner.errors import UserError

log = logging.getLogger(__name__)

KEY_BATCH = 64  # prompts per forward pass when reading keys (a mass edit of thousands of requests stays in memory)


@dataclass(frozen=True)
class MemitSettings:
    layers: tuple[int, ...] = (1, 2, 3, 4, 5)
    value: RomeSettings = RomeSettings()  # z*'s optimisation (its ``layer`` is ignored: the last of ``layers``)
    mom2_update_weight: float = 15000.0
    # AlphaEdit (null_space=True): project updates off the preserved keys' span
    null_space: bool = False
    nullspace_threshold: float = 2e-2
    l2: float = 10.0


def null_space_projector(second_moment: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = U U^T over the singular vectors of C whose singular values are below ``threshold``."""
    u, s, _ = torch.linalg.svd(second_moment.double())
    small = u[:, s < threshold]
    if small.shape[1] in (0, len(s)):
        raise UserError(f"method.nullspace_threshold={threshold}: {small.shape[1]} of {len(s)} directions of C fall below it, so the null space is "
                        f"{'empty' if not small.shape[1] else 'everything'}; C's singular values run from {float(s[-1]):.3g} to {float(s[0]):.3g}")
    log.info("AlphaEdit null space: %d of %d directions of C (singular values < %g)", small.shape[1], len(s), threshold)
    return (small @ small.T).float()


def keys_at(model, tokenizer, module, requests: list[EditRequest], template_groups: list[list[str]]) -> torch.Tensor:
    """(in, n): each request's key, the module input at its last subject token averaged within each
    group of templates, then over the groups (as MEMIT does: the bare prompt weighs as much as a group).
    The prompts of several requests share a forward pass (``KEY_BATCH`` prompts at a time)."""
    prompts = [encode_subject_prompt(tokenizer, request.prompt, request.subject, context)
               for request in requests for group in template_groups for context in group]
    keys = torch.cat([io_at(model, module, prompts[i : i + KEY_BATCH], tokenizer.pad_token_id)[0] for i in range(0, len(prompts), KEY_BATCH)])
    columns, start = [], 0
    for _ in requests:
        group_means = []
        for group in template_groups:
            group_means.append(keys[start : start + len(group)].mean(0))
            start += len(group)
        columns.append(torch.stack(group_means).mean(0))
    return torch.stack(columns, dim=1)


def last_layer_outputs(model, tokenizer, module, requests: list[EditRequest]) -> torch.Tensor:
    """(hidden, n): the module's output at each request's last subject token on its bare prompt."""
    prompts = [encode_subject_prompt(tokenizer, r.prompt, r.subject) for r in requests]
    _, outputs = io_at(model, module, prompts, tokenizer.pad_token_id)
    return outputs.T


def memit_update(model, tokenizer, requests: list[EditRequest], template_groups: list[list[str]], settings: MemitSettings,
                 second_moments: dict[int, torch.Tensor], modules: ModuleTemplates = ModuleTemplates(),
                 cache: dict[int, torch.Tensor] | None = None, projectors: dict[int, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], list]:
    """Apply a batch of edits layer by layer; return ``{weight name: dW}`` (applied) and the value fits.

    Unlike ``rome_update`` the deltas are applied as they are computed (each layer's keys are
    read after the earlier layers changed). AlphaEdit's ``cache`` (per layer, K_p K_p^T) is
    updated in place with this batch's keys.
    """
    last = settings.layers[-1]
    z_module = modules.layer_module(model, last)
    was_training = model.training
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    deltas: dict[str, torch.Tensor] = {}
    try:
        starts = last_layer_outputs(model, tokenizer, z_module, requests)
        templates = [t for group in template_groups for t in group]
        fits = [fit_value(model, tokenizer, z_module, request, templates, settings.value, starts[:, i]) for i, request in enumerate(requests)]
        targets = torch.stack([fit.value for fit in fits], dim=1)  # (hidden, n)
        for position, layer in enumerate(settings.layers):
            module = modules.mlp_out_module(model, layer)
            keys = keys_at(model, tokenizer, module, requests, template_groups).double()  # (in, n)
            residual = (targets - last_layer_outputs(model, tokenizer, z_module, requests)).double() / (len(settings.layers) - position)
            c = second_moments[layer].double().to(keys.device)
            if settings.null_space:
                p = projectors[layer].double().to(keys.device)
                previous = cache[layer].double().to(keys.device) if cache is not None and layer in cache else torch.zeros_like(c)
                lhs = p @ (keys @ keys.T + previous) + settings.l2 * torch.eye(len(c), dtype=c.dtype, device=c.device)
                update_t = torch.linalg.solve(lhs, p @ keys @ residual.T)  # (in, out)
                delta = outer_update(module, torch.eye(len(c), dtype=c.dtype, device=c.device), update_t.T).float()
                if cache is not None:
                    cache[layer] = (previous + keys @ keys.T).float().cpu()
            else:
                adjusted = torch.linalg.solve(settings.mom2_update_weight * c + keys @ keys.T, keys)  # (in, n)
                delta = outer_update(module, adjusted, residual).float()
            name = modules.mlp_out.format(layer) + ".weight"
            with torch.no_grad():
                parameter = model.get_parameter(name)
                parameter.add_(delta.to(parameter.device, parameter.dtype))
            deltas[name] = delta
    except BaseException:
        with torch.no_grad():  # a failure half-way leaves no layer half-edited
            for name, delta in deltas.items():
                parameter = model.get_parameter(name)
                parameter.sub_(delta.to(parameter.device, parameter.dtype))
        raise
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return deltas, fits
