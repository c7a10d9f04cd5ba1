"""Perplexity of held-out documents, for text tasks (continual pre-training, TiC-style sequences).

Each test document is cut into the windows that training uses (``formatting.document_windows``)
and every document token is scored once, after the start token and the window's earlier tokens.
The task's figure pools all tokens of the split, as a corpus perplexity does (TiC-LM, lm-eval's
``word_perplexity`` pools in the same way): ``log_perplexity`` is the mean negative
log-likelihood in nats per token, ``perplexity`` its exponential. Lower is better.

The windows go through ``choice_loglikelihoods`` as one-choice items (the start token as the
prompt), so they share its batching and forward-pass savings. An ensemble's members are averaged
in log-likelihood per window, as their choice scores are: its perplexity is the geometric mean of
the members' (a mixture of their probabilities would score lower). A router sends whole windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from cl_runner.evaluation.loglikelihood import choice_loglikelihoods
from cl_runner.formatting import ChoiceRequest, PromptFormatter
from cl_runner.tasks import Task
from cl_runner.training.batching import padded_batches


def perplexity_scores(model, formatter: PromptFormatter, task: Task, batch_size: int, device, members: Sequence, router,
                      answers: Callable) -> dict[str, float]:
    """``{"perplexity": .., "log_perplexity": ..}`` of the task's test documents.

    ``router`` (given the windows as padded batches) may send each window to one member;
    ``answers(member, items, score)`` runs ``score(items)`` under a member's context.
    """
    windows = [w for example in task.test for w in formatter.windows_of(example.target)]
    requests = [ChoiceRequest(w.input_ids[:1], [w.input_ids[1:]]) for w in windows]
    routes = router(lambda: padded_batches([w.input_ids for w in windows], batch_size, device)) if router is not None else None
    chosen = [list(range(len(windows))) if routes is None else [i for i, r in enumerate(routes) if r == m] for m in range(len(members))]
    pad_id = formatter.tokenizer.pad_token_id

    def score(items):
        return [loglik[0] for loglik in choice_loglikelihoods(model, [requests[i] for i in items], pad_id, batch_size, device)]

    per_member = [answers(member, chosen[m], score) for m, member in enumerate(members)]
    logliks = [sum(values) / len(values) for values in ([m[i] for m in per_member if i in m] for i in range(len(windows)))]
    tokens = sum(len(r.choices[0]) for r in requests)
    nats = -sum(logliks) / tokens
    return {"perplexity": math.exp(nats) if nats < 700 else math.inf, "log_perplexity": nats}  # a diverged model: inf, not a crash
