"""Context templates: short texts the model writes itself, each followed by ``". {}"``.

ROME and MEMIT average a fact's key over the bare prompt and prompts behind such prefixes, so
the edit fires whatever precedes the subject. The prefixes are sampled from the model (top-k,
seeded), so they are what this model finds natural; the method saves them with its
checkpoint, so a resumed run edits with the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def sample_continuations(model, tokenizer, starts: Sequence[str], new_tokens: int, seed: int, top_k: int = 5) -> list[str]:
    """One top-k sampled continuation of each start text (``new_tokens`` tokens), seeded."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    texts = []
    was_training = model.training
    model.eval()
    try:
        for start in starts:
            ids = torch.tensor([tokenizer(start)["input_ids"]], device=device)
            for _ in range(new_tokens):
                logits = model(input_ids=ids).logits[0, -1].float().cpu()
                top = logits.topk(top_k)
                choice = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=generator)]
                ids = torch.cat([ids, choice.view(1, 1).to(device)], dim=1)
            texts.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


def context_templates(model, tokenizer, lengths: Sequence[Sequence[int]] = ((5, 10), (10, 10)), seed: int = 0) -> list[str]:
    """``["{}"]`` plus, for each ``(tokens, count)``, ``count`` sampled prefixes of that many tokens, each + ``". {}"``."""
    templates = ["{}"]
    for group, (new_tokens, count) in enumerate(lengths):
        starts = [STARTS[i % len(STARTS)] for i in range(count)]
        for text in sample_continuations(model, tokenizer, starts, new_tokens, seed=seed * 1000 + group):
            # Braces in generated text would read as format fields; they are not needed.
            templates.append(text.replace("{", " ").replace("}", " ").strip() + ". {}")
    return templates
