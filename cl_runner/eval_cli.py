"""``cl-runner-eval``: score evaluations again on a stored run, from its task checkpoints, without training.

    cl-runner-eval outputs/runs/default eval=full
    cl-runner-eval outputs/runs/default '+eval.suites.harness._target_=cl_runner.evaluation.harness.HarnessSuite' \\
        '+eval.suites.harness.tasks=[arc_easy]'

The run's own overrides (``<run dir>/.hydra/overrides.yaml``) are composed with the ones given,
which may only touch ``eval``: everything else about the run stays as it was trained. Every
evaluated row (finished or interrupted run) gets the new suites' scores (``abilities`` in
state.json and, for a finished run, results.json). The run's eval settings become the new ones:
to resume an interrupted run afterwards, pass them too, with ``hydra.run.dir=<run dir>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from cl_runner.errors import UserError, find_user_error, one_line


def eval_overrides(overrides: list[str]) -> list[str]:
    """The overrides, each checked to set something under ``eval``."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key != "eval" and not key.startswith("eval."):
            raise UserError(f"cl-runner-eval changes evaluation only; {override!r} is not an eval setting (the run is re-scored as it was trained)")
    return overrides


def run_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "state.json").is_file() or not path.is_file():
        raise UserError(f"{run_dir} is not a cl-runner run directory (no state.json and .hydra/overrides.yaml)")
    return list(yaml.safe_load(path.read_text()) or [])


def rescore(run_dir: Path, overrides: list[str]) -> dict:
    from cl_runner.cli import _quiet_libraries
    from cl_runner.config import compose_config
    from cl_runner.run_lock import RunLock
    from cl_runner.runner import Experiment

    _quiet_libraries()
    overrides = eval_overrides(overrides)
    cfg = compose_config([*run_overrides(run_dir), *overrides])
    with RunLock(run_dir):  # not while a run is training in it
        return Experiment(cfg, run_dir, rescoring=True).rescore()


def main(argv: list[str] | None = None) -> None:
    import logging

    parser = argparse.ArgumentParser(prog="cl-runner-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (outputs/runs/<name> or a sweep's job folder)")
    parser.add_argument("overrides", nargs="*", help="eval overrides, e.g. eval=full or +eval.suites.<name>...")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        results = rescore(args.run_dir, args.overrides)
    except Exception as exc:
        if find_user_error(exc) is None:
            raise
        print(f"cl-runner-eval: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    rows = results.get("acc_matrix") or results.get("abilities") or []
    print(f"re-scored {len(rows)} rows of {args.run_dir}")


if __name__ == "__main__":
    main()
