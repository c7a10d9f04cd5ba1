"""Learning without Forgetting (Li & Hoiem, 2016) for a causal LM: distillation, no stored data.

One adapter (the ``peft:`` block, LoRA by default) trains through the sequence. While task t
trains, the model as it was before the task (the adapter as task t-1 left it, kept as a frozen
copy; for the first task the base model, adapters off) reads the same inputs, and the loss
gains ``weight * T^2 * KL(p_prev || p_current)`` of the two next-token distributions at the
temperature ``T``, averaged over the answer positions (where the task's loss is read), logged
as ``lwf_distillation`` (unweighted, the step's last micro-batch). The teacher runs without
dropout and the student with it, so the term is not exactly 0 at the start of a task. ``first_task: false`` skips the first task, as the paper
has no earlier tasks there; by default it distils from the base model, which keeps what the
pre-trained model does. The teacher copy is rebuilt from the adapter the previous task's
checkpoint holds, so a resumed run needs no state of its own.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from cl_runner.errors import UserError
from cl_runner.forward import forward_selected
from cl_runner.methods.base import ContinualMethod
from cl_runner.methods.peft_adapter import PeftAdapter
from cl_runner.peft_utils import peft_config
from cl_runner.training.loss import MODEL_INPUTS

PREVIOUS = "previous"


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1), log_target=True, reduction="batchmean") * temperature**2


class LwF(ContinualMethod):
    def __init__(self, peft: dict, weight: float = 1.0, temperature: float = 2.0, first_task: bool = True):
        if not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"method.weight must be a non-negative number, got {weight!r}")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise UserError(f"method.temperature must be a positive number, got {temperature!r}")
        self.adapter = PeftAdapter(peft, mode="sequential")
        self.peft, self.weight, self.temperature, self.first_task = peft, float(weight), float(temperature), bool(first_task)
        self.current = 0
        self._distillation = None

    def setup(self, model):
        return self.adapter.setup(model)

    def before_task(self, model, task_index: int, task) -> None:
        self.adapter.before_task(model, task_index, task)
        self.current = task_index
        if task_index > 0:  # the teacher: a frozen copy of the adapter as the previous task left it
            if PREVIOUS not in model.peft_config:
                model.add_adapter(PREVIOUS, peft_config(self.peft))
            current = self.adapter.adapter_name(task_index)
            if model.peft_config[current].is_prompt_learning:  # PEFT's state dict would leave P-tuning's encoder out
                model.prompt_encoder[PREVIOUS].load_state_dict(model.prompt_encoder[current].state_dict())
            else:
                set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=current), adapter_name=PREVIOUS)
            model.set_adapter(self.adapter.adapter_name(task_index))
            for name, p in model.named_parameters():
                if f".{PREVIOUS}." in f".{name}.":
                    p.requires_grad_(False)

    def trainable_parameters(self, model):
        return self.adapter.trainable_parameters(model)

    def teacher(self, model):
        return model.disable_adapter() if self.current == 0 else self.adapter.using(model, PREVIOUS)

    def extra_loss(self, model, batch, outputs):
        if self.current == 0 and not self.first_task:
            return None
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        model.eval()  # no dropout in the teacher (and no random numbers drawn)
        try:
            with torch.no_grad(), self.teacher(model):
                teacher = forward_selected(model, batch["input_ids"], batch["read_rows"], batch["read_cols"], **inputs).logits.float()
        finally:
            model.train()
        term = distillation(outputs.logits, teacher, self.temperature)
        self._distillation = float(term.detach())
        return self.weight * term

    def step_report(self):
        return {"lwf_distillation": self._distillation} if self._distillation is not None else None

    def eval_context(self, model, tasks_learnt: int, task_index: int):
        return self.adapter.eval_context(model, tasks_learnt, task_index)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        self.adapter.save_checkpoint(model, directory, task_index)

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.adapter.load_checkpoint(model, directories)
        self.current = len(directories) - 1
