"""The hooks a method may implement. The runner calls them; the training loop owns the step.

A method overrides only what differs from plain sequential fine-tuning of whatever
parameters are trainable: how the model is wrapped (``setup``), what happens around a task
(``before_task`` sees the task's data, ``after_task``), extra loss terms that may read model
internals (``extra_loss``), what it keeps of a finished task (``consolidate``: a Fisher, an
episodic memory), how it changes a step's gradient (``adjust_gradients``), which weights
answer each task at evaluation (``eval_context``) and what it must save to resume
(``save_checkpoint`` / ``load_checkpoint``). ``learn`` is where a method that does not train
by gradient (a closed-form weight edit) would step in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cl_runner.errors import UserError
from cl_runner.tasks import Task


class ContinualMethod:
    """No-op defaults. Subclass once (no deeper hierarchies) and override what differs."""

    def setup(self, model: torch.nn.Module) -> torch.nn.Module:
        """Wrap or modify the freshly loaded model; return the model to train and evaluate."""
        return model

    def use_tokenizer(self, tokenizer) -> None:
        """Called once after ``setup`` with the model's tokenizer (editors encode facts themselves)."""

    def before_task(self, model: torch.nn.Module, task_index: int, task: Task) -> None:
        """Called before training task ``task_index`` (0-based); ``task.train`` holds its data."""

    def trainable_parameters(self, model: torch.nn.Module) -> Iterable[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def learn(self, model: torch.nn.Module, task_index: int, task: Task, train: Callable[[], dict]) -> dict:
        """Learn one task. The default runs the shared training loop (``train()``) and returns its stats.

        ``train(task_indices)`` trains on those tasks' examples together instead, ``train("all")`` on
        every task's (joint training)."""
        return train()

    def extra_loss(self, model: torch.nn.Module, batch: dict, outputs) -> torch.Tensor | None:
        """A term added to the loss of every optimizer step (None: nothing); computed per micro-batch.

        ``outputs.loss`` is the micro-batch's mean answer-token cross-entropy (what
        ``model(**batch).loss`` would be), ``outputs.token_losses`` each answer token's,
        ``outputs.logits`` the logits each answer token was read from, and
        ``outputs.last_hidden_state`` the decoder's output aligned with ``batch["input_ids"]``.
        In the packed layouts (``trainer.batch_layout``) a row holds several examples, and with
        a shared prefix only what follows the prefix: answer token n is read at
        ``(batch["read_rows"][n], batch["read_cols"][n])``. A method that
        needs other internals registers forward hooks in ``setup``.
        """
        return None

    def step_report(self) -> dict | None:
        """Scalars added to each optimizer step's record in train_log.jsonl and W&B (e.g. the
        terms of ``extra_loss`` apart, so a user sees their scale); None: nothing."""
        return None

    def adjust_gradients(self, model: torch.nn.Module, parameters: list[torch.nn.Parameter], gradients, step: int) -> None:
        """Called once per optimizer step, after the step's backward passes and before clipping
        and the optimizer step: ``p.grad`` of each of ``parameters`` (what the optimizer steps,
        fp32) holds the step's gradient, which the method may change in place (GEM's
        projection). ``gradients.of(examples)`` is the gradient of other examples' loss, aligned
        with ``parameters`` (:class:`cl_runner.training.gradients.GradientProbe`); ``step``
        counts the task's optimizer steps from 1 (seed anything random with it: a resumed task
        repeats its steps)."""

    def after_task(self, model: torch.nn.Module, task_index: int, task: Task) -> None:
        """Called after training task ``task_index``, before it is evaluated and checkpointed."""

    def consolidate(self, model: torch.nn.Module, task_index: int, examples: list, gradients) -> None:
        """Called after ``after_task`` with the task's encoded training examples
        (``TokenizedExample``) and a gradient probe over the trainable parameters: what a
        method keeps of a task to protect it later (EWC's Fisher, GEM's episodic memory).
        Whatever it keeps goes into ``save_checkpoint``."""

    def eval_context(self, model: torch.nn.Module, tasks_learnt: int, task_index: int):
        """A context manager under which task ``task_index`` is evaluated, ``tasks_learnt`` tasks in."""
        return contextlib.nullcontext()

    def eval_members(self, model: torch.nn.Module, tasks_learnt: int, task_index: int) -> list[Callable[[], contextlib.AbstractContextManager]]:
        """The models whose answers are combined to score task ``task_index``: their choice
        log-likelihoods averaged, their generations put to a majority vote. Default: the one
        model of ``eval_context``; an ensemble returns one context per member."""
        return [lambda: self.eval_context(model, tasks_learnt, task_index)]

    def route_examples(self, model: torch.nn.Module, tasks_learnt: int, task_index: int | None, prompt_batches) -> list[int] | None:
        """Send each test example of task ``task_index`` (None: the general probe) to one member of
        ``eval_members`` (its index), e.g. by identifying the task from the prompt;
        ``prompt_batches()`` yields the test prompts as padded batches. None: every member answers
        every example."""
        return None

    def row_report(self, tasks_learnt: int) -> dict | None:
        """Anything the method measured while row ``tasks_learnt`` was scored (e.g. task-identification
        accuracy); kept per row in ``results.json`` as ``method_reports``."""
        return None

    def rollback(self, model: torch.nn.Module, task_name: str) -> bool:
        """Undo what learning task ``task_name`` changed; True when the weights are restored bit for bit."""
        raise UserError(f"method {type(self).__name__} cannot roll tasks back (rollback= needs a method that keeps each task's exact change, e.g. an editor)")

    def save_checkpoint(self, model: torch.nn.Module, directory: Path, task_index: int) -> None:
        """Write what is needed to restore the model after task ``task_index`` into ``directory``."""
        raise NotImplementedError

    def load_checkpoint(self, model: torch.nn.Module, directories: list[Path]) -> None:
        """Restore the state after the last completed task; ``directories[t]`` holds task t's checkpoint."""
        raise NotImplementedError
