"""Edit + LoRA (the design document's ``ContinualLearningWithEditing``): knowledge tasks
(``type: edit``) are written into the base weights by an editor (ROME, MEMIT or AlphaEdit, the
``editor:`` block), skill tasks (every other task) train one LoRA adapter through the sequence.
Each task's exact change is kept, so ``rollback=[name]`` undoes either kind by task name.

The editor works on the base model inside the PEFT wrapper (its module names are the plain
model's), so the LoRA adapter should not target the edited projection (``down_proj``), or
an edit would be computed on outputs the adapter also moves. Checkpoints: ``editor/`` (edited
weights, templates, edit history), ``lora/`` (the adapter), ``skills/`` (the adapter's change
per skill task).
"""

from __future__ import annotations

from pathlib import Path

from cl_runner.config import build
from cl_runner.editing.history import EditHistory
from cl_runner.methods.base import ContinualMethod
from cl_runner.methods.peft_adapter import PeftAdapter


class EditPlusLora(ContinualMethod):
    def __init__(self, editor: dict, peft: dict):
        self.editor = build(editor, "method.editor")
        self.adapters = PeftAdapter(peft, mode="sequential")
        self.skills = EditHistory()
        self.last_skill: str | None = None  # the skill task just learnt (its change goes into this task's checkpoint)

    def use_tokenizer(self, tokenizer) -> None:
        self.editor.use_tokenizer(tokenizer)

    def setup(self, model):
        model = self.adapters.setup(model)
        self.editor.check_model(model.get_base_model())
        return model

    def _lora_names(self, model) -> list[str]:
        return [n for n, p in model.named_parameters() if p.requires_grad]

    def before_task(self, model, task_index: int, task) -> None:
        if not task.requests:
            self.adapters.before_task(model, task_index, task)

    def trainable_parameters(self, model):
        return self.adapters.trainable_parameters(model)

    def learn(self, model, task_index: int, task, train) -> dict:
        self.last_skill = None
        if task.requests:  # a knowledge task: the editor writes it into the base weights
            return self.editor.learn(model.get_base_model(), task_index, task, train)
        before = self.skills.snapshot(model, self._lora_names(model))
        stats = self.adapters.learn(model, task_index, task, train)
        self.skills.record(task.name, model, before)
        self.last_skill = task.name
        return stats

    def eval_members(self, model, tasks_learnt: int, task_index: int):
        return self.adapters.eval_members(model, tasks_learnt, task_index)

    def rollback(self, model, task_name: str) -> bool:
        if task_name in self.skills.changes:
            return self.skills.rollback(task_name, model)
        return self.editor.rollback(model.get_base_model(), task_name)

    def save_checkpoint(self, model, directory: Path, task_index: int) -> None:
        for part in ("editor", "lora", "skills"):
            (directory / part).mkdir(exist_ok=True)
        self.editor.save_checkpoint(model.get_base_model(), directory / "editor", task_index)
        self.adapters.save_checkpoint(model, directory / "lora", task_index)
        if self.last_skill is not None:
            self.skills.save(directory / "skills", self.last_skill)

    def load_checkpoint(self, model, directories: list[Path]) -> None:
        self.adapters.load_checkpoint(model, [d / "lora" for d in directories])
        self.editor.load_checkpoint(model.get_base_model(), [d / "editor" for d in directories])
        for directory in directories:
            if (directory / "skills" / "edit_history.safetensors").exists():
                self.skills.load(directory / "skills")
