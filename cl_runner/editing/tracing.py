"""Causal tracing (Meng et al. 2022): which hidden states carry a fact from the subject to the answer.

One clean run and ``samples`` corrupted runs of the prompt go through the model as one batch
(row 0 clean); the corrupted rows get seeded Gaussian noise (``noise`` = 3 x the standard
deviation of subject-token embeddings) added to the embeddings of the subject's tokens. For
each (token, layer), the clean run's state there is copied into the corrupted rows and the
probability of the clean answer token at the last position is averaged over them:

- ``hidden``: the decoder layer's output at that token;
- ``mlp`` / ``attn``: the MLP's / the attention block's output at that token, in a window of
  ``window`` layers centred on the layer (as the paper does, so a single layer's share shows).

``low`` (all corrupted) and ``high`` (clean) bound the scores; the indirect effect is score -
low. Module names come from templates, so any LLaMA-layout model works (not only GPT-2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from cl_runner.editing.activations import encode_subject_prompt
from cl_runner.editing.layout import num_layers

KINDS = ("hidden", "mlp", "attn")


@dataclass(frozen=True)
class TraceModules:
    embed: str = "model.embed_tokens"
    layer: str = "model.layers.{}"
    mlp: str = "model.layers.{}.mlp"
    attn: str = "model.layers.{}.self_attn"

    def of_kind(self, kind: str) -> str:
        return {"hidden": self.layer, "mlp": self.mlp, "attn": self.attn}[kind]


@dataclass
class Trace:
    tokens: list[str]
    subject_range: tuple[int, int]  # [first, last] token positions of the subject
    answer: str
    scores: torch.Tensor  # (tokens, layers): the answer's probability with that state restored
    low: float
    high: float
    kind: str

    @property
    def effect(self) -> torch.Tensor:
        return self.scores - self.low


def subject_range(tokenizer, prompt: str, subject: str) -> tuple[list[int], int, int]:
    """Token ids of the prompt with the subject, and the subject's first and last token positions."""
    encoded = encode_subject_prompt(tokenizer, prompt, subject)
    prefix = prompt[: prompt.index("{}")].rstrip(" ")  # the space before the subject belongs to its first token
    first = len(tokenizer(prefix)["input_ids"]) if prefix else len(tokenizer("")["input_ids"])
    return encoded.input_ids, min(first, encoded.subject_last), encoded.subject_last


def _replace_at(output, rows: slice, token: int, value: torch.Tensor):
    hidden = output[0] if isinstance(output, tuple) else output
    hidden = hidden.clone()
    hidden[rows, token] = value
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def _hooks(model, hooks: list[tuple[str, object]]):
    handles = [model.get_submodule(name).register_forward_hook(fn) for name, fn in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def embedding_noise_scale(model, tokenizer, subjects: list[str], modules: TraceModules = TraceModules(), factor: float = 3.0) -> float:
    """``factor`` x the standard deviation of the subjects' token embeddings (the paper's noise level)."""
    table = model.get_submodule(modules.embed).weight
    ids = sorted({i for s in subjects for i in tokenizer(" " + s, add_special_tokens=False)["input_ids"]})
    return factor * float(table[ids].detach().float().std())


@torch.no_grad()
def trace(model, tokenizer, prompt: str, subject: str, noise: float, kind: str = "hidden", samples: int = 10, window: int = 10, seed: int = 0,
          modules: TraceModules = TraceModules(), positions: list[int] | None = None, only_layers: list[int] | None = None) -> Trace:
    """The (token x layer) table of restored answer probabilities for one fact (``prompt`` holds ``{}``);
    ``positions`` / ``only_layers`` (None: all) limit which cells are computed (the others stay NaN)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, first, last = subject_range(tokenizer, prompt, subject)
    batch = torch.tensor([ids] * (samples + 1), device=device)
    generator = torch.Generator().manual_seed(seed)
    corruption = torch.randn(samples, last - first + 1, model.get_submodule(modules.embed).embedding_dim, generator=generator) * noise

    def corrupt(_module, _args, output):
        output = output.clone()
        output[1:, first : last + 1] += corruption.to(output.device, output.dtype)
        return output

    layers = num_layers(model)
    template = modules.of_kind(kind)
    clean_states: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(_module, _args, output):
            clean_states[layer] = (output[0] if isinstance(output, tuple) else output)[0].detach().clone()
        return hook

    try:
        with _hooks(model, [(template.format(l), keep(l)) for l in range(layers)]):
            probs = model(input_ids=batch[:1]).logits[0, -1].float().softmax(-1)
        answer = int(probs.argmax())
        high = float(probs[answer])
        with _hooks(model, [(modules.embed, corrupt)]):
            low = float(model(input_ids=batch).logits[1:, -1].float().softmax(-1)[:, answer].mean())
            scores = torch.full((len(ids), layers), float("nan"))
            for token in range(len(ids)) if positions is None else [p % len(ids) for p in positions]:
                for layer in range(layers) if only_layers is None else only_layers:
                    restored = [layer] if kind == "hidden" else range(max(0, layer - window // 2), min(layers, layer - window // 2 + window))

                    def restore(l):
                        return lambda _m, _a, output: _replace_at(output, slice(1, None), token, clean_states[l][token])

                    with _hooks(model, [(template.format(l), restore(l)) for l in restored]):
                        scores[token, layer] = model(input_ids=batch).logits[1:, -1].float().softmax(-1)[:, answer].mean()
    finally:
        model.train(was_training)
    return Trace([tokenizer.decode([i]) for i in ids], (first, last), tokenizer.decode([answer]), scores, low, high, kind)
