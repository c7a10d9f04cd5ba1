"""PeftAdapter: any PEFT method, named by the ``peft:`` block of the method YAML.

``mode: sequential`` trains one adapter through the whole sequence (``seq_lora`` and the PEFT
family baselines). ``mode: per_task`` adds a fresh adapter for each task; ``inference`` says
how the adapters answer (the design document's ``MultiTaskLoraFramework``):

- ``oracle``: each task is scored with its own adapter (needs the task id at test time); tasks
  not learnt yet are scored on the base model;
- ``ensemble``: every learnt adapter answers every task; their choice log-likelihoods are
  averaged and their generations put to a majority vote (no task id);
- ``merge``: the learnt adapters are merged into one (LoRA only; ``merge.method``: ``mean``,
  the mean of the task deltas, or PEFT's ``linear``, ``svd``, ``ties``, ``dare_linear``,
  ``dare_ties``, ``magnitude_prune`` with ``merge.density``), which answers every task (no task
  id): the design document's ``LoRAContinualLearner``, shipped as ``lora_merge``.

Row 0 of the matrix is always the base model: adapters are switched off for it, which matters
for methods that change the output before any training (prompt and P-tuning).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from peft import LoraConfig, get_peft_model

from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.peft_utils import FoldedLora, load_adapter, peft_config, save_adapter

MODES = ("sequential", "per_task")
INFERENCE = ("oracle", "ensemble", "merge")
# Our names -> PEFT's add_weighted_adapter combination types. "mean" concatenates the adapters'
# ranks with weights 1/n, so the merged delta is exactly the mean of the task deltas; PEFT's
# "linear" instead sums the A and B matrices separately (cross terms between tasks).
MERGE_METHODS = {"mean": "cat", "linear": "linear", "svd": "svd", "ties": "ties", "dare_linear": "dare_linear",
                 "dare_ties": "dare_ties", "magnitude_prune": "magnitude_prune"}
MERGED = "merged"


class PeftAdapter(ContinualMethod):
    def __init__(self, peft: dict, mode: str = "sequential", inference: str = "oracle", merge: dict | None = None):
        if mode not in MODES:
            raise UserError(f"method.mode '{mode}' is not one of {list(MODES)}")
        if inference not in INFERENCE:
            raise UserError(f"method.inference '{inference}' is not one of {list(INFERENCE)}")
        if inference != "oracle" and mode != "per_task":
            raise UserError(f"method.inference={inference} combines per-task adapters: it needs method.mode=per_task")
        config = peft_config(peft)  # a bad block fails now, before the model is loaded
        self.merge = {"method": "mean", "density": None, "weights": None, **dict(merge or {})}
        if inference == "merge":
            self._check_merge(config)
        self.peft, self.mode, self.inference = peft, mode, inference
        self.current = 0
        self._merged_from = 0  # how many task adapters the merged adapter was built from
        self.folded = FoldedLora()  # scoring with the adapter folded into the weights (CPU, fp32)

    def _check_merge(self, config) -> None:
        if not isinstance(config, LoraConfig):
            raise UserError(f"method.inference=merge merges LoRA adapters; method.peft is a {type(config).__name__}")
        if self.merge["method"] not in MERGE_METHODS:
            raise UserError(f"method.merge.method '{self.merge['method']}' is not one of {list(MERGE_METHODS)}")
        if self.merge["method"] in ("ties", "dare_linear", "dare_ties", "magnitude_prune") and self.merge["density"] is None:
            raise UserError(f"method.merge.method={self.merge['method']} needs method.merge.density (the share of each delta kept, e.g. 0.5)")

    def adapter_name(self, task_index: int) -> str:
        return "default" if self.mode == "sequential" else f"task_{task_index}"

    def adapter_file(self, task_index: int) -> str:
        return "adapter.safetensors" if self.mode == "sequential" else f"adapter_{self.adapter_name(task_index)}.safetensors"

    def setup(self, model):
        return get_peft_model(model, peft_config(self.peft), adapter_name=self.adapter_name(0))

    def _activate(self, model, task_index: int) -> None:
        name = self.adapter_name(task_index)
        if name not in model.peft_config:
            model.add_adapter(name, peft_config(self.peft))
        model.set_adapter(name)

    def before_task(self, model, task_index: int, task) -> None:
        self._activate(model, task_index)
        self.current = task_index

    def trainable_parameters(self, model):
        # Only the active adapter: PEFT leaves earlier prompt encoders trainable after set_adapter.
        name = self.adapter_name(self.current)
        return [p for n, p in model.named_parameters() if p.requires_grad and f".{name}." in f".{n}."]

    @contextlib.contextmanager
    def using(self, model, name: str):
        """Answer with adapter ``name``; the one being trained is active again afterwards."""
        model.set_adapter(name)
        try:
            yield
        finally:
            model.set_adapter(self.adapter_name(self.current))

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        if tasks_learnt == 0 or (self.mode == "per_task" and self.inference == "oracle" and task_index >= tasks_learnt):
            return model.disable_adapter()
        if self.mode == "sequential":
            return self.folded.scoring(model)
        if self.inference == "merge":
            self._build_merged(model, tasks_learnt)
            return self._scoring_with(model, MERGED)
        return self._scoring_with(model, self.adapter_name(task_index))

    @contextlib.contextmanager
    def _scoring_with(self, model, name: str):
        with self.using(model, name), self.folded.scoring(model):
            yield

    def eval_members(self, model, tasks_learnt: int, task_index: int):
        if self.inference != "ensemble" or tasks_learnt == 0:
            return super().eval_members(model, tasks_learnt, task_index)
        return self.adapter_members(model, tasks_learnt)

    def adapter_members(self, model, tasks_learnt: int):
        """One member per learnt task adapter (an ensemble, or the candidates a router picks from)."""
        return [lambda t=t: self.using(model, self.adapter_name(t)) for t in range(tasks_learnt)]

    def merge_weights(self, count: int) -> list[float]:
        weights = self.merge["weights"]
        if weights is None:
            return [1.0 / count] * count
        if len(weights) < count:
            raise UserError(f"method.merge.weights has {len(weights)} entries; {count} tasks are learnt")
        return [float(w) for w in weights[:count]]

    def _build_merged(self, model, tasks_learnt: int) -> None:
        """The merged adapter of the first ``tasks_learnt`` task adapters (rebuilt when that number changes)."""
        if self._merged_from == tasks_learnt and MERGED in model.peft_config:
            return
        if MERGED in model.peft_config:
            model.delete_adapter(MERGED)
        self.folded.invalidate()  # PEFT writes the merged weights through .data, which bumps no version counter
        names = [self.adapter_name(t) for t in range(tasks_learnt)]
        options = {"density": self.merge["density"]} if self.merge["density"] is not None else {}
        # DARE's random pruning draws from its own stream, seeded by the run (the last task's seed):
        # the merged adapter does not depend on which task was scored first, nor on the rank that scores it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() + tasks_learnt)
            model.add_weighted_adapter(names, self.merge_weights(tasks_learnt), MERGED, combination_type=MERGE_METHODS[self.merge["method"]], **options)
        model.set_adapter(self.adapter_name(self.current))
        # New modules start in training mode: the merged adapter's dropout would drop activations
        # while it is scored (it is built here, inside scoring, after the model was put in eval mode).
        model.train(model.training)
        self._merged_from = tasks_learnt

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        save_adapter(model, directory / self.adapter_file(task_index), self.adapter_name(task_index))

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        last = len(directories) - 1
        restore = range(last + 1) if self.mode == "per_task" else [last]
        for task_index in restore:
            if self.adapter_name(task_index) not in model.peft_config:
                model.add_adapter(self.adapter_name(task_index), peft_config(self.peft))
            load_adapter(model, directories[task_index] / self.adapter_file(task_index), self.adapter_name(task_index))
        self._activate(model, last)
        self.current = last
        self.folded.invalidate()
