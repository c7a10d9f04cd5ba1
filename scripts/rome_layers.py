"""ROME, one edit at a time, on facts of the built-in edit set that SmolLM2 knows: CounterFact's
efficacy, paraphrase and neighbourhood scores per edited layer, with and without the
covariance (second-moment) adjustment. Each edit is applied, scored and rolled back exactly.

    python scripts/rome_layers.py --facts 12 --layers 1 2 3 5 9 --no-cov-layers 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cl_runner.editing.contexts import context_templates
from cl_runner.editing.covariance import second_moment, settings_from
from cl_runner.editing.history import EditHistory
from cl_runner.editing.layout import ModuleTemplates
from cl_runner.editing.metrics import aggregate, counterfact_scores
from cl_runner.editing.requests import parse_requests
from cl_runner.editing.rome import RomeSettings, rome_update
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
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        model, tokenizer = load_model(compose("config").model)
    model.eval()
    requests = known_facts(args.facts)
    templates = context_templates(model, tokenizer)
    modules = ModuleTemplates()
    rows = [(layer, True) for layer in args.layers] + [(layer, False) for layer in args.no_cov_layers]
    print("| layer | covariance | efficacy | paraphrase | neighbourhood | score | efficacy magnitude | s per edit |")
    print("|---|---|---|---|---|---|---|---|")
    for layer, use_cov in rows:
        cov = second_moment(model, tokenizer, modules.mlp_out_module(model, layer), modules.mlp_out.format(layer), settings_from({}),
                            default_cache_dir() / "covariance") if use_cov else None
        settings = RomeSettings(layer=layer, mom2_adjustment=use_cov)
        scores, started = [], time.perf_counter()
        for request in requests:
            deltas, _ = rome_update(model, tokenizer, request, templates, settings, cov)
            history = EditHistory()
            before = history.snapshot(model, list(deltas))
            with torch.no_grad():
                for name, delta in deltas.items():
                    model.get_parameter(name).add_(delta)
            history.record(request.case_id, model, before)
            scores.extend(counterfact_scores(model, tokenizer, [request]))
            assert history.rollback(request.case_id, model)
        total = aggregate(scores)
        seconds = (time.perf_counter() - started) / len(requests)
        print(f"| {layer} | {'yes' if use_cov else 'no'} | {total['efficacy']:.2f} | {total['paraphrase']:.2f} | {total['neighborhood']:.2f} | "
              f"{total['score']:.2f} | {total['efficacy_magnitude']:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
