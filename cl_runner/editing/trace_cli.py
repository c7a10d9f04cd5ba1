"""cl-runner-trace: causal-tracing tables and heatmaps for facts, on any LLaMA-layout model.

    cl-runner-trace --facts 0 60 120 --out traces/                  # built-in edit requests by case_id
    cl-runner-trace --prompt "The mother tongue of {} is" --subject "Angela Merkel"
    cl-runner-trace --facts 0 -- model=qwen2_5_0_5b_instruct        # Hydra overrides after --

For each fact and kind (hidden, mlp, attn) it writes ``<case>_<kind>.json`` (tokens, subject
range, answer, scores, low, high) and ``<case>_<kind>.png``, and prints the layer with the
largest MLP effect at the last subject token (what ROME's ``layer: auto`` edits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cl_runner.atomic_io import write_json_atomic
from cl_runner.editing.requests import parse_requests
from cl_runner.editing.tracing import KINDS, embedding_noise_scale, trace
from cl_runner.errors import UserError

BUILTIN_FACTS = Path(__file__).resolve().parents[1] / "tasks" / "builtin" / "data" / "counterfacts.jsonl"


def load_facts(case_ids: list[int]) -> list[tuple[str, str, str]]:
    records = {r["case_id"]: r for r in map(json.loads, BUILTIN_FACTS.read_text().splitlines())}
    missing = [c for c in case_ids if c not in records]
    if missing:
        raise UserError(f"no built-in fact with case_id {missing} (0..{len(records) - 1})")
    requests = parse_requests([records[c] for c in case_ids], "counterfact", str(BUILTIN_FACTS))
    return [(str(c), r.prompt, r.subject) for c, r in zip(case_ids, requests)]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="cl-runner-trace", description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, nargs="*", default=[], help="case_ids of the built-in edit set")
    parser.add_argument("--prompt", help="a prompt with {} for the subject")
    parser.add_argument("--subject")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/traces"))
    args = parser.parse_args(argv)
    try:
        facts = load_facts(args.facts)
        if args.prompt or args.subject:
            if not (args.prompt and args.subject and "{}" in args.prompt):
                raise UserError("--prompt (with {} for the subject) and --subject go together")
            facts.append(("custom", args.prompt, args.subject))
        if not facts:
            raise UserError("name facts: --facts CASE_ID ... or --prompt ... --subject ...")
        from cl_runner.config import compose_config
        from cl_runner.models import load_model

        model, tokenizer = load_model(compose_config(overrides).model)
    except UserError as error:
        sys.exit(f"cl-runner-trace: error: {error}")
    from cl_runner.plots import plot_trace

    noise = embedding_noise_scale(model, tokenizer, [subject for _, _, subject in facts])
    args.out.mkdir(parents=True, exist_ok=True)
    for case, prompt, subject in facts:
        for kind in args.kinds:
            result = trace(model, tokenizer, prompt, subject, noise, kind=kind, samples=args.samples, seed=args.seed)
            stem = args.out / f"{case}_{kind}"
            write_json_atomic(stem.with_suffix(".json"), {"prompt": prompt, "subject": subject, "kind": kind, "tokens": result.tokens,
                                                          "subject_range": list(result.subject_range), "answer": result.answer,
                                                          "scores": result.scores.tolist(), "low": result.low, "high": result.high})
            plot_trace(result.tokens, result.subject_range, result.scores.numpy(), result.low, kind, result.answer, stem.with_suffix(".png"))
            if kind == "mlp":
                best = int(result.effect[result.subject_range[1]].argmax())
                print(f"{case}: {prompt.replace('{}', subject)!r} -> {result.answer!r}: largest MLP effect at the last subject token in layer {best}")
        print(f"{case}: written {args.out}/{case}_*.json, .png")


if __name__ == "__main__":
    main()
