"""Generate the offline covariance corpus that ships with cl-runner (cl_runner/editing/data/).

Editors weigh a new fact's key against C = E[k k^T] of the edited layer's inputs over ordinary
text (cl_runner/editing/covariance.py). With no hub to download Wikipedia from, the default
corpus is text sampled from SmolLM2-135M-Instruct itself (nucleus sampling, top-p 0.95, seeded,
20 different opening words): ordinary English in the model's own distribution. Sampling it
takes minutes on a CPU, so it is done once here and the file ships; any model can use it
(it is text), and method.covariance.corpus=generated samples from the edited model instead.

    python scripts/make_edit_corpus.py            # about 10-20 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cl_runner.editing.covariance import CovarianceSettings, generated_texts
from cl_runner.models import load_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "cl_runner" / "editing" / "data" / "generated_corpus.jsonl")
    parser.add_argument("--texts", type=int, default=320, help="texts of 128 tokens each")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("config")
    model, tokenizer = load_model(cfg.model)
    model.eval()
    settings = CovarianceSettings(corpus="generated", text_tokens=128, batch_size=32, seed=args.seed)
    lines = []
    for index, ids in zip(range(args.texts), generated_texts(model, tokenizer, settings)):
        lines.append(json.dumps({"text": tokenizer.decode(ids, skip_special_tokens=True)}, ensure_ascii=False))
        if (index + 1) % 32 == 0:
            print(f"{index + 1}/{args.texts} texts", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(args.out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
