"""EasyEdit's locality compares an edited model's answers with the unedited model's.

The runner takes those reference tokens when it sets a run up, before a resumed run loads its
checkpoints: the weights are the base model's then, so a resumed run compares against the same
tokens an uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable


def attach_locality_references(model, tokenizer, tasks, base_of: Callable[[int], Callable], batch_size: int) -> None:
    """Set each edit task's ``locality_reference``, computed under ``base_of(task_index)`` (the
    method's row-0 weights), which must be entered while the model holds no learnt task."""
    edit_tasks = [(i, t) for i, t in enumerate(tasks) if t.type == "edit"]
    if not edit_tasks:
        return
    from cl_runner.editing.metrics import locality_reference

    for index, task in edit_tasks:
        with base_of(index)():
            task.locality_reference = locality_reference(model, tokenizer, task.requests, batch_size)
