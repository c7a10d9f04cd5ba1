"""Multiple-choice evaluation speed: cl-runner's scorer against lm-evaluation-harness' HFLM.

    pip install -e .[bench]      # lm-eval
    python scripts/benchmark_eval.py [--model smollm2_135m] [--task country_continent] [--batch-size 16] [--repeats 2]

Both sides score the same items with the same model object, the same chat template and the
same batch size: for every item and choice, the log-likelihood of the choice's answer as the
template writes it (``North America<|im_end|>`` and the template's newline) after the prompt.
lm-eval gets them as ``loglikelihood`` requests (context = the rendered prompt, continuation =
the answer text) and tokenizes them its own way (whole string, then split), so the printed
``max |d loglik|`` checks that both scored the same tokens. Accuracies are computed from each
side's log-likelihoods with the same definitions (``acc``; ``acc_norm`` divides by the choice's
length in characters). lm-eval is timed on its model calls only (``HFLM.loglikelihood``), not
its task pipeline, so the ratio is a lower bound of the gain over a full ``lm_eval`` run.
After an untimed warm-up, the two alternate A B A B; the best time of each is reported.
A benchmark, not a test: machines are noisy, read the ratio.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import torch

from cl_runner.config import compose_config
from cl_runner.evaluation.loglikelihood import choice_loglikelihoods, choice_metrics
from cl_runner.formatting import PromptFormatter
from cl_runner.models import load_model
from cl_runner.tasks import load_task


def ours(model, formatter, examples, batch_size):
    requests = [formatter.encode_choices(e) for e in examples]
    return choice_loglikelihoods(model, requests, formatter.tokenizer.pad_token_id, batch_size, torch.device("cpu"))


def lm_eval_requests(formatter, examples):
    """(context, continuation) strings: the rendered prompt, and the answer text exactly as the template follows it."""
    from lm_eval.api.instance import Instance

    tokenizer = formatter.tokenizer
    requests = []
    for index, example in enumerate(examples):
        context = tokenizer.apply_chat_template(formatter._messages(example.prompt), add_generation_prompt=True, tokenize=False)
        for j, choice in enumerate(example.choices):
            full = tokenizer.apply_chat_template(formatter._messages(example.prompt, choice), add_generation_prompt=False, tokenize=False)
            assert full.startswith(context)
            requests.append(Instance(request_type="loglikelihood", doc={"item": index}, arguments=(context, full[len(context) :]), idx=j))
    return requests


def reference(lm, requests, examples):
    results = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
    return [[next(results) for _ in e.choices] for e in examples]


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--task", default="country_continent")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("transformers", "lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from lm_eval.models.huggingface import HFLM

    cfg = compose_config([f"model={args.model}"])
    model, tokenizer = load_model(cfg.model)
    model.eval()
    formatter = PromptFormatter(tokenizer, cfg.model.use_chat_template, cfg.model.system_prompt, cfg.trainer.max_length)
    examples = load_task(args.task).test
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    requests = lm_eval_requests(formatter, examples)
    choices = {len(e.choices) for e in examples}
    print(f"model={args.model} task={args.task} items={len(examples)} choices={sorted(choices)} batch={args.batch_size} threads={torch.get_num_threads()}")

    ours(model, formatter, examples[: args.batch_size], args.batch_size)  # untimed warm-up of both
    reference(lm, requests[: sum(len(e.choices) for e in examples[: args.batch_size])], examples[: args.batch_size])
    times = {"cl-runner": [], "lm-eval HFLM": []}
    for repeat in range(args.repeats):
        seconds, our_scores = timed(ours, model, PromptFormatter(tokenizer, cfg.model.use_chat_template, cfg.model.system_prompt, cfg.trainer.max_length), examples, args.batch_size)
        times["cl-runner"].append(seconds)
        seconds, their_scores = timed(reference, lm, requests, examples)
        times["lm-eval HFLM"].append(seconds)
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
    targets = [e.target for e in examples]
    option_lists = [e.choices for e in examples]
    for name, scores in (("cl-runner", our_scores), ("lm-eval HFLM", their_scores)):
        metrics = choice_metrics(option_lists, targets, scores)
        print(f"{name:14s} {min(times[name]):6.1f} s (best of {args.repeats})   acc {metrics['acc']:.3f}   acc_norm {metrics['acc_norm']:.3f}")
    difference = max(abs(a - b) for ours_item, theirs in zip(our_scores, their_scores) for a, b in zip(ours_item, theirs))
    print(f"max |d loglik| between the two: {difference:.2e}")
    print(f"ratio lm-eval time / cl-runner time: {min(times['lm-eval HFLM']) / min(times['cl-runner']):.2f}")


if __name__ == "__main__":
    main()
