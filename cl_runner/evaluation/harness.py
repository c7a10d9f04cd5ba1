"""lm-evaluation-harness on the run's model, in process, as a suite: ``eval.suites.harness``.

    cl-runner +eval.suites.harness._target_=cl_runner.evaluation.harness.HarnessSuite \
        '+eval.suites.harness.tasks=[arc_easy,mmlu]' '+eval.suites.harness.rows=[0,-1]'

lm-eval's ``simple_evaluate`` runs on the model as the method deploys it after each chosen row
(adapters active, nothing saved or reloaded), through lm-eval's own ``HFLM`` wrapper, so its
prompts, few-shot sampling and metrics are lm-eval's. Each score is stored per row under
``abilities.harness`` as ``<task>/<metric>`` (lm-eval's filter name appended when it is not
``none``); rows not chosen hold null. Tasks come from lm-eval's registry (hub datasets: MMLU,
GSM8K, ARC, HumanEval where the hub is reachable) or from ``include_path``, a folder of task
YAMLs in lm-eval's format that may read local files (tested offline that way;
``include_defaults: false`` then skips indexing lm-eval's own registry).
"""

from __future__ import annotations

import logging
import math

from cl_runner.errors import UserError

log = logging.getLogger("cl_runner")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError("eval.suites.harness needs lm-evaluation-harness: pip install -e .[harness] (or pip install lm-eval)") from exc
    return lm_eval.simple_evaluate, HFLM, TaskManager


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's ``results`` ({task: {"acc,none": .., "acc_stderr,none": .., "alias": .., "sample_len": ..}}) as ``{"task/acc": ..}``."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            # Metrics are "metric,filter"; other keys (alias, sample_len) describe the task.
            if not comma or not isinstance(value, (int, float)) or isinstance(value, bool) or metric.endswith("_stderr"):
                continue
            name = f"{task}/{metric}" if filter_name == "none" else f"{task}/{metric}/{filter_name}"
            flat[name] = None if isinstance(value, float) and math.isnan(value) else float(value)
    return flat


class HarnessSuite:
    headline = None  # the first task's first metric

    def __init__(self, tasks: list[str], rows: list[int] | None = None, num_fewshot: int | None = None, limit: float | None = None,
                 include_path: str | None = None, include_defaults: bool = True, batch_size: int = 8, apply_chat_template: bool = False,
                 seed: int = 0, confirm_run_unsafe_code: bool = False):
        if not tasks:
            raise UserError("eval.suites.harness.tasks is empty: name lm-eval tasks, e.g. [arc_easy]")
        self.tasks = list(tasks)
        self.rows = None if rows is None else [int(r) for r in rows]
        self.num_fewshot, self.limit, self.include_path, self.include_defaults = num_fewshot, limit, include_path, include_defaults
        self.batch_size, self.apply_chat_template, self.seed = batch_size, apply_chat_template, seed
        self.confirm_run_unsafe_code = confirm_run_unsafe_code  # lm-eval's own switch for tasks that execute model code (HumanEval)
        self.task_manager = None

    def scores_row(self, row: int, rows: int) -> bool:
        """Whether row ``row`` of ``rows`` is chosen (``rows: null``: all; negative indices count from the end)."""
        return self.rows is None or row in {r % rows for r in self.rows}

    def setup(self, model, formatter, members, device, batch_size: int) -> None:
        """Check the tasks exist (before any training), with lm-eval's task list."""
        _, _, TaskManager = _lm_eval()
        # Indexing lm-eval's own task registry takes ~10 s; include_defaults: false skips it (local tasks only).
        self.task_manager = TaskManager(include_path=self.include_path, include_defaults=self.include_defaults)
        unknown = [t for t in self.tasks if t not in self.task_manager.all_tasks]
        if unknown:
            where = f" or in {self.include_path}" if self.include_path else " (add include_path: a folder of task YAMLs)"
            raise UserError(f"eval.suites.harness: lm-eval knows no task {', '.join(unknown)}{where}")

    def score(self, model, formatter, members, device, batch_size: int) -> dict[str, float | None]:
        simple_evaluate, HFLM, _ = _lm_eval()
        per_member = []
        for member in members:
            with member():
                lm = HFLM(pretrained=model, tokenizer=formatter.tokenizer, batch_size=self.batch_size)
                results = simple_evaluate(
                    model=lm, tasks=self.tasks, num_fewshot=self.num_fewshot, limit=self.limit, task_manager=self.task_manager,
                    apply_chat_template=self.apply_chat_template, log_samples=False, random_seed=self.seed, numpy_random_seed=self.seed,
                    torch_random_seed=self.seed, fewshot_random_seed=self.seed, verbosity="WARNING",
                    confirm_run_unsafe_code=self.confirm_run_unsafe_code,
                )
            per_member.append(flatten_results(results["results"]))
        # An ensemble's members are each scored; the row holds their mean.
        return {key: _mean([m.get(key) for m in per_member]) for key in per_member[0]}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
