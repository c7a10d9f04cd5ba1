"""Training throughput: cl-runner's loop against a plain Hugging Face Trainer + PEFT reference.

    python scripts/benchmark_throughput.py [--data builtin|mixed] [--layouts padded,auto] [--model smollm2_135m] [--examples 192] [--batch-size 8]

Both sides train the same LoRA (conf/method/seq_lora.yaml) on the same model, the same
examples and the same batch size, for one epoch each, after an untimed warm-up, alternating
them. ``--data builtin``: the built-in tasks mixed with the general-instruction data (45-56
tokens); ``--data mixed``: seeded synthetic instructions of 3 to 120 words with answers of 1 to
24 words, all through the chat template. cl-runner runs in each ``trainer.batch_layout``
(padded, shared_prefix, prefix_tree, auto; packed with --layouts), the reference pads each batch to its longest example
(DataCollatorForSeq2Seq), as the Trainer does by default, and also runs with
train_sampling_strategy="group_by_length". Reported: non-padding tokens per second, best of the
repeats, and the ratios. A benchmark, not a test: machines are noisy, read the ratio.
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import time
import warnings

import torch
from omegaconf import OmegaConf

from cl_runner.config import compose_config
from cl_runner.formatting import PromptFormatter
from cl_runner.methods.base import ContinualMethod
from cl_runner.models import load_model
from cl_runner.replay import NoReplay
from cl_runner.config import build
from cl_runner.tasks import Example, load_task
from cl_runner.training import TrainingLoop

TASKS = ["second_word", "last_word", "general_instructions"]
WORDS = ("river stone light paper garden window music winter silver forest engine market doctor letter planet "
         "summer bridge island orange rabbit castle bottle pencil mirror yellow basket ticket butter camera jacket").split()
LAYOUTS = ("padded", "shared_prefix", "prefix_tree", "auto")


def builtin_examples(formatter, count, seed=0):
    examples = [formatter.encode_example(e) for name in TASKS for e in load_task(name).train]
    random.Random(seed).shuffle(examples)
    return examples[:count]


def mixed_examples(formatter, count, seed=0):
    """Instructions of 3 to 120 words, answers of 1 to 24 words (seeded)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 120)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))
        examples.append(formatter.encode_example(Example(f"Continue the list: {prompt}", answer)))
    return examples


def ours(cfg, base_model, examples, pad_id, layout):
    method = build(cfg.method, "method")
    model = method.setup(copy.deepcopy(base_model))
    trainer_cfg = OmegaConf.merge(cfg.trainer, {"batch_layout": layout})
    loop = TrainingLoop(trainer_cfg, torch.device("cpu"), pad_id)
    stats = loop.train(model, method.trainable_parameters(model), examples, ContinualMethod(), NoReplay(), seed=0)
    return stats["tokens"] / stats["seconds"]


def reference(cfg, base_model, tokenizer, examples, group_by_length):
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from cl_runner.peft_utils import peft_config

    model = get_peft_model(copy.deepcopy(base_model), peft_config(cfg.method.peft))
    data = Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples])
    args = TrainingArguments(
        output_dir="/tmp/cl_runner_bench_hf", per_device_train_batch_size=cfg.trainer.batch_size, num_train_epochs=1,
        # warmup_steps below 1 is a ratio of the total steps in transformers 5.
        learning_rate=cfg.trainer.lr, warmup_steps=cfg.trainer.warmup_ratio, max_grad_norm=cfg.trainer.max_grad_norm,
        lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_steps=10_000, use_cpu=True,
        train_sampling_strategy="group_by_length" if group_by_length else "random", dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    started = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - started
    return sum(len(e.input_ids) for e in examples) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["builtin", "mixed"], default="builtin")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated trainer.batch_layout values to run")
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--examples", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    cfg = compose_config([f"model={args.model}", f"trainer.batch_size={args.batch_size}", "trainer.progress_bar=false"])
    model, tokenizer = load_model(cfg.model)
    make_examples = builtin_examples if args.data == "builtin" else mixed_examples
    examples = make_examples(PromptFormatter(tokenizer, max_length=cfg.trainer.max_length), args.examples)
    lengths = [len(e.input_ids) for e in examples]
    print(f"model={args.model} data={args.data} examples={len(examples)} batch={args.batch_size} lengths {min(lengths)}-{max(lengths)} tokens, threads={torch.get_num_threads()}")
    # Untimed warm-up of both: the first batches of each new shape pay one-off kernel set-up costs.
    warmup = examples[: 2 * args.batch_size]
    ours(cfg, model, warmup, tokenizer.pad_token_id, "prefix_tree")
    reference(cfg, model, tokenizer, warmup, group_by_length=False)
    layouts = args.layouts.split(",")
    runs = {f"cl-runner ({layout})": (lambda layout=layout: ours(cfg, model, examples, tokenizer.pad_token_id, layout)) for layout in layouts}
    runs["HF Trainer (default)"] = lambda: reference(cfg, model, tokenizer, examples, group_by_length=False)
    runs["HF Trainer (group_by_length)"] = lambda: reference(cfg, model, tokenizer, examples, group_by_length=True)
    results = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            results[name].append(run())
        print(f"repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in results.items()), flush=True)
    best = {k: max(v) for k, v in results.items()}
    for name, value in best.items():
        print(f"{name:30s} {value:8.1f} non-padding tokens/s (best of {args.repeats})")
    for layout in layouts:
        for name in ("HF Trainer (default)", "HF Trainer (group_by_length)"):
            print(f"ratio cl-runner ({layout}) / {name}: {best[f'cl-runner ({layout})'] / best[name]:.2f}")


if __name__ == "__main__":
    main()
