"""ROME, one edit at a time, on facts of the built-in edit set that SmolLM2 knows: CounterFact's
efficacy, paraphrase and neighbourhood scores per edited layer, with and without the
covariance (second-moment) adjustment, EasyEdit's rewrite accuracy and locality, and the
fluency of greedy continuations of the fact's generation prompts (the base model's in the
first row). Each edit is applied, scored and rolled back exactly.

    python scripts/rome_layers.py --facts 12 --layers 1 2 3 5 9 --no-cov-layers 2 --out rome_layers.jsonl

With ``--out``, each finished row is appended to that file and a rerun skips the rows it holds
(the whole table takes hours on 2 CPU cores, so it may span several invocations).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cl_runner.editing.contexts import context_templates
from cl_runner.editing.covariance import second_moment, settings_from
from cl_runner.editing.history import EditHistory
from cl_runner.editing.layout import ModuleTemplates
from cl_runner.editing.metrics import aggregate, counterfact_scores, locality_reference
from cl_runner.editing.requests import parse_requests
from cl_runner.editing.rome import RomeSettings, rome_update
from cl_runner.evaluation.fluency import generation_fluency
from cl_runner.formatting import PromptFormatter
from cl_runner.models import default_cache_dir, load_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "cl_runner" / "tasks" / "builtin" / "data" / "counterfacts.jsonl"


def known_facts(count: int):
    records = [json.loads(line) for line in DATA.read_text().splitlines()]
    known = [r for r in records if r["base_prefers_true"]]
    step = max(1, len(known) // count)
    return parse_requests(known[::step][:count], "counterfact", str(DATA))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=12)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    parser.add_argument("--no-cov-layers", type=int, nargs="*", default=[2])
    parser.add_argument("--fluency-tokens", type=int, default=96, help="greedy tokens after each generation prompt")
    parser.add_argument("--out", type=Path, default=None, help="JSONL of finished rows: appended to, and rows in it are not computed again")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        model, tokenizer = load_model(compose("config").model)
    model.eval()
    requests = known_facts(args.facts)
    done = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out and args.out.exists() else []
    done = [row for row in done if row["facts"] == args.facts and row["fluency_tokens"] == args.fluency_tokens]
    templates = context_templates(model, tokenizer)
    modules = ModuleTemplates()
    raw = PromptFormatter(tokenizer, False, None, 512)
    reference = locality_reference(model, tokenizer, requests)

    def fluency_of(request) -> float:
        return generation_fluency(model, raw, list(request.generation_prompts), args.fluency_tokens, 16, "cpu", [nullcontext])

    base_fluency = sum(fluency_of(r) for r in requests) / len(requests)
    rows = [(layer, True) for layer in args.layers] + [(layer, False) for layer in args.no_cov_layers]
    print(f"{len(requests)} facts; fluency of the unedited model: {base_fluency:.2f}")
    print("| layer | covariance | efficacy | paraphrase | neighbourhood | score | efficacy magnitude | rewrite acc | locality | fluency | s per edit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layer, use_cov in rows:
        finished = next((row for row in done if row["layer"] == layer and row["covariance"] == use_cov), None)
        if finished is None:
            finished = edit_row(model, tokenizer, requests, templates, modules, reference, fluency_of, layer, use_cov)
            if args.out:
                with args.out.open("a") as handle:
                    handle.write(json.dumps({**finished, "facts": args.facts, "fluency_tokens": args.fluency_tokens}) + "\n")
        print(markdown_row(finished), flush=True)


def markdown_row(row: dict) -> str:
    cells = [row["layer"], "yes" if row["covariance"] else "no", *(f"{row[k]:.2f}" for k in (
        "efficacy", "paraphrase", "neighborhood", "score", "efficacy_magnitude", "rewrite_acc", "locality", "fluency")), f"{row['seconds_per_edit']:.0f}"]
    return "| " + " | ".join(map(str, cells)) + " |"


def edit_row(model, tokenizer, requests, templates, modules, reference, fluency_of, layer: int, use_cov: bool) -> dict:
    """Edit each fact alone at ``layer``, score it, roll it back; the means over the facts."""
    cov = second_moment(model, tokenizer, modules.mlp_out_module(model, layer), modules.mlp_out.format(layer), settings_from({}),
                        default_cache_dir() / "covariance") if use_cov else None
    settings = RomeSettings(layer=layer, mom2_adjustment=use_cov)
    scores, fluencies, seconds = [], [], 0.0
    for index, request in enumerate(requests):
        started = time.perf_counter()
        deltas, _ = rome_update(model, tokenizer, request, templates, settings, cov)
        seconds += time.perf_counter() - started  # the edit itself, not its scoring
        history = EditHistory()
        before = history.snapshot(model, list(deltas))
        with torch.no_grad():
            for name, delta in deltas.items():
                model.get_parameter(name).add_(delta)
        history.record(request.case_id, model, before)
        scores.extend(counterfact_scores(model, tokenizer, [request], reference=[reference[index]]))
        fluencies.append(fluency_of(request))
        assert history.rollback(request.case_id, model)
    total = aggregate(scores)
    return {"layer": layer, "covariance": use_cov, **total, "fluency": sum(fluencies) / len(fluencies), "seconds_per_edit": seconds / len(requests)}


if __name__ == "__main__":
    main()
