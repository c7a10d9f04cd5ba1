"""Scoring one row's tasks with the LoRA adapter folded into the weights against unfolded, side by side.

    python scripts/benchmark_fold.py [--repeats 2]

The default run's model and sequence (SmolLM2-135M, word_positions), a seq_lora adapter whose B
matrices are drawn at random (std 0.01, as a trained adapter is non-zero), the four tasks of a
row scored alternately unfolded (FoldedLora switched off) and folded; prints seconds and accuracies.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from cl_runner.config import compose_config
from cl_runner.runner import Experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = compose_config(["logger=none", "eval.progress_bar=false", "trainer.progress_bar=false"])
    experiment = Experiment(cfg, Path(tempfile.mkdtemp()) / "run")
    experiment.run_dir.mkdir(parents=True)
    experiment._setup()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in experiment.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    method = experiment.method
    members_of = lambda i: method.eval_members(experiment.model, 1, i)  # noqa: E731
    router_of = lambda i: (lambda prompts: method.route_examples(experiment.model, 1, i, prompts))  # noqa: E731
    folding = method.folded.scoring
    for repeat in range(1, args.repeats + 1):
        timings = {}
        for label, scoring in (("unfolded", lambda model: contextlib.nullcontext()), ("folded", folding)):
            method.folded.scoring = scoring
            started = time.perf_counter()
            scores = experiment._score_tasks(members_of, router_of, label)
            timings[label] = (time.perf_counter() - started, [round(s["acc"], 2) for s in scores])
        print(f"repeat {repeat}: " + ", ".join(f"{label} {seconds:.1f} s acc {acc}" for label, (seconds, acc) in timings.items()))


if __name__ == "__main__":
    main()
