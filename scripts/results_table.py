"""Print a Markdown table of the metrics in one or more run directories.

    python scripts/results_table.py outputs/runs/*

Each row is read from <run dir>/results.json; the command column is rebuilt from the run's
Hydra overrides (<run dir>/.hydra/overrides.yaml), less those that cannot change results.
Several seeds of one command: ``cl-runner-report`` (mean ± std).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cl_runner.report import read_overrides

COLUMNS = ("acc", "avg_acc", "bwt", "fwt", "forgetting", "new_acc")


def command_of(run_dir: Path) -> str:
    # Overrides that cannot change results (logger, progress bars) share the run directory too.
    return " ".join(["cl-runner", *(f"{k}={v}" for k, v in read_overrides(run_dir).items())])


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def row(run_dir: Path) -> str:
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["metrics"]
    general = results.get("general") or []
    probe = f"{general[0]:.2f} -> {general[-1]:.2f}" if general else "-"
    cells = [f"`{command_of(run_dir)}`", *(fmt(metrics[c]) for c in COLUMNS), probe]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    runs = [Path(p) for p in sys.argv[1:] if (Path(p) / "results.json").exists()]
    if not runs:
        sys.exit("usage: python scripts/results_table.py RUN_DIR [RUN_DIR ...] (folders holding results.json)")
    print("| command | " + " | ".join(COLUMNS) + " | general probe (base -> final) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for run_dir in runs:
        print(row(run_dir))


if __name__ == "__main__":
    main()
