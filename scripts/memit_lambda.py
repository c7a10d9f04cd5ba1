"""MEMIT's covariance weight lambda (``method.mom2_update_weight``) on SmolLM2-135M: one batch of
the built-in edit set written with each lambda, scored (CounterFact's efficacy, paraphrase and
neighbourhood, EasyEdit's locality) and undone. z* does not depend on lambda, so it is
optimised once and reused.

MEMIT's 15000 was chosen for GPT-J, whose MLP keys have 16384 dimensions; SmolLM2's have 1536,
and the update along a key shrinks roughly as (key dimension / lambda), which is why a smaller
lambda may suit a smaller model. This prints the evidence for the value conf/method/memit.yaml uses.

    python scripts/memit_lambda.py --batch 10 --lambdas 15000 5000 1500 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from cl_runner.editing import memit as memit_module
from cl_runner.editing.contexts import context_templates
from cl_runner.editing.covariance import second_moment, settings_from
from cl_runner.editing.layout import ModuleTemplates
from cl_runner.editing.memit import MemitSettings, memit_update
from cl_runner.editing.metrics import aggregate, counterfact_scores, locality_reference
from cl_runner.editing.requests import parse_requests
from cl_runner.models import default_cache_dir, load_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "cl_runner" / "tasks" / "builtin" / "data" / "counterfacts.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10, help="the first N requests of the built-in set, edited at once")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[15000, 5000, 1500, 500])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    import json

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        model, tokenizer = load_model(compose("config").model)
    model.eval()
    records = [json.loads(line) for line in DATA.read_text().splitlines()][: args.batch]
    requests = parse_requests(records, "counterfact", str(DATA))
    flat = context_templates(model, tokenizer, ((10, 5),))
    groups = [flat[:1], flat[1:]]
    modules = ModuleTemplates()
    covs = {layer: second_moment(model, tokenizer, modules.mlp_out_module(model, layer), modules.mlp_out.format(layer), settings_from({}),
                                 default_cache_dir() / "covariance") for layer in args.layers}
    reference = locality_reference(model, tokenizer, requests)
    before = aggregate(counterfact_scores(model, tokenizer, requests, reference=reference))

    fitted, fit_value = {}, memit_module.fit_value

    def fit_once(model_, tokenizer_, module, request, templates, settings, start):  # z* is the same for every lambda
        if request.case_id not in fitted:
            fitted[request.case_id] = fit_value(model_, tokenizer_, module, request, templates, settings, start)
        return fitted[request.case_id]

    memit_module.fit_value = fit_once
    print(f"{len(requests)} requests edited at once, layers {args.layers}")
    print("| lambda | efficacy | paraphrase | neighbourhood | score | locality | s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| unedited | {before['efficacy']:.2f} | {before['paraphrase']:.2f} | {before['neighborhood']:.2f} | {before['score']:.2f} | {before['locality']:.2f} | |", flush=True)
    for weight in args.lambdas:
        started = time.perf_counter()
        deltas, _ = memit_update(model, tokenizer, requests, groups, MemitSettings(tuple(args.layers), mom2_update_weight=weight), covs, modules)
        seconds = time.perf_counter() - started
        total = aggregate(counterfact_scores(model, tokenizer, requests, reference=reference))
        with torch.no_grad():
            for name, delta in deltas.items():
                model.get_parameter(name).sub_(delta)
        print(f"| {weight:g} | {total['efficacy']:.2f} | {total['paraphrase']:.2f} | {total['neighborhood']:.2f} | {total['score']:.2f} | "
              f"{total['locality']:.2f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
