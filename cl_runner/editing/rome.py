"""ROME (Meng et al., NeurIPS 2022): one fact written as a rank-one update of one MLP output projection.

For a request (subject s, prompt p, new target o*) at layer L, with W the MLP's output
projection (key k = its input, value = its output):

1. k*: W's input at the last token of s, averaged over the bare prompt and the context
   templates (``contexts.py``); with the second-moment adjustment, u = C^-1 k* / ||C^-1 k*||
   (C = E[k k^T] over a corpus, ``covariance.py``), else u = k* / ||k*||.
2. v*: a vector delta added to W's output at the last subject token of every prompt is
   optimised (Adam, ``v_lr``, at most ``v_num_grad_steps``, stop when the loss < 0.05) for
   NLL(o* | context + p(s)) averaged over prompts + ``kl_factor`` KL(edited || original) of the
   next-token distribution at s's last token in ``"{s} is a"`` + ``v_weight_decay``
   ||delta|| / ||v0||^2, clamped to ||delta|| <= ``clamp_norm_factor`` ||v0||; v* = v0 + delta,
   with v0 W's output on the bare prompt.
3. With k, v0 W's input and output on the bare prompt: dW = (v* - v0) u^T / (k . u).

All of it in float32 (float64 for the solve); the model's own weights are frozen meanwhile
and the update is returned, not only applied, so it can be stored and rolled back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_runner.editing.activations import adding_at, encode_subject_prompt, io_at, right_padded, target_ids
from cl_runner.editing.layout import ModuleTemplates, outer_update
from cl_runner.forward import forward_selected
from cl_runner.editing.requests import EditRequest


@dataclass(frozen=True)
class RomeSettings:
    layer: int = 2
    v_num_grad_steps: int = 25
    v_lr: float = 0.5
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    kl_prompt: str = "{} is a"
    mom2_adjustment: bool = True
    early_stop_loss: float = 5e-2


@dataclass
class ValueFit:
    value: torch.Tensor  # v*
    initial_nll: float
    final_nll: float
    steps: int


def fact_key(model, tokenizer, module: torch.nn.Module, request: EditRequest, templates: list[str]) -> torch.Tensor:
    """k*: the module's input at the subject's last token, averaged over the context templates."""
    prompts = [encode_subject_prompt(tokenizer, request.prompt, request.subject, context) for context in templates]
    keys, _ = io_at(model, module, prompts, tokenizer.pad_token_id)
    return keys.mean(0)


def update_direction(key: torch.Tensor, second_moment: torch.Tensor | None, ridge: float = 0.0) -> torch.Tensor:
    """u = C^-1 k* (the second-moment adjustment) or k*, normalised."""
    if second_moment is None:
        return key / key.norm()
    c = second_moment.double().to(key.device)
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype, device=c.device)
    u = torch.linalg.solve(c, key.double()).float()
    return u / u.norm()


def fit_value(model, tokenizer, module: torch.nn.Module, request: EditRequest, templates: list[str], settings: RomeSettings,
              start_value: torch.Tensor) -> ValueFit:
    """v*: ``start_value`` (the module's output on the bare prompt) plus the optimised delta (step 2 above)."""
    device = next(model.parameters()).device
    target = target_ids(tokenizer, request.target_new)
    rewrites = [encode_subject_prompt(tokenizer, request.prompt, request.subject, context) for context in templates]
    kl_prompt = encode_subject_prompt(tokenizer, settings.kl_prompt, request.subject)
    sequences = [r.input_ids + target[:-1] for r in rewrites] + [kl_prompt.input_ids]
    ids, mask = right_padded(sequences, tokenizer.pad_token_id, device)
    rows = torch.arange(len(sequences), device=device)
    cols = torch.tensor([r.subject_last for r in rewrites] + [kl_prompt.subject_last], device=device)
    # Teacher forcing: target token i of prompt p is predicted at position len(prompt p) - 1 + i;
    # the KL term reads the last position read (the KL prompt's subject's last token). The
    # vocabulary projection runs at these positions only (forward_selected).
    read_rows = torch.tensor([p for p in range(len(rewrites)) for _ in target] + [len(rewrites)], device=device)
    read_cols = torch.tensor([len(r.input_ids) - 1 + i for r in rewrites for i in range(len(target))] + [kl_prompt.subject_last], device=device)
    read_tokens = torch.tensor(target * len(rewrites), device=device)

    delta = torch.zeros_like(start_value, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.v_lr)
    max_norm = settings.clamp_norm_factor * start_value.norm()
    initial_kl, initial_nll, nll, step = None, None, None, 0
    for step in range(settings.v_num_grad_steps):
        optimizer.zero_grad()
        with adding_at(module, rows, cols, delta):
            log_probs = forward_selected(model, ids, read_rows, read_cols, attention_mask=mask).logits.float().log_softmax(-1)
        nll = -log_probs[torch.arange(len(read_tokens), device=device), read_tokens].view(len(rewrites), len(target)).mean(1).mean()
        kl_log_probs = log_probs[-1]
        if initial_kl is None:  # delta is zero on the first pass: the unedited distribution
            initial_kl, initial_nll = kl_log_probs.detach(), nll.item()
        kl = torch.sum(kl_log_probs.exp() * (kl_log_probs - initial_kl))  # KL(edited || original), as ROME's code computes it
        decay = delta.norm() / start_value.norm() ** 2
        loss = nll + settings.kl_factor * kl + settings.v_weight_decay * decay
        if loss.item() < settings.early_stop_loss or step == settings.v_num_grad_steps - 1:
            break
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return ValueFit((start_value + delta).detach(), initial_nll, nll.item(), step + 1)


def rome_update(model, tokenizer, request: EditRequest, templates: list[str], settings: RomeSettings, second_moment: torch.Tensor | None,
                modules: ModuleTemplates = ModuleTemplates(), ridge: float = 0.0) -> tuple[dict[str, torch.Tensor], ValueFit]:
    """The weight delta ``{module name: dW}`` that writes ``request`` at ``settings.layer`` (not applied), and the value fit."""
    module = modules.mlp_out_module(model, settings.layer)
    was_training = model.training
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        key = fact_key(model, tokenizer, module, request, templates)
        u = update_direction(key, second_moment if settings.mom2_adjustment else None, ridge)
        bare = encode_subject_prompt(tokenizer, request.prompt, request.subject)
        bare_key, bare_value = (t[0] for t in io_at(model, module, [bare], tokenizer.pad_token_id))
        fit = fit_value(model, tokenizer, module, request, templates, settings, bare_value)
        right = (fit.value - bare_value) / torch.dot(bare_key, u)
        delta = outer_update(module, u.unsqueeze(1), right.unsqueeze(1))
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {modules.mlp_out.format(settings.layer) + ".weight": delta}, fit
