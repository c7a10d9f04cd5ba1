"""Tasks declared in YAML (lm-evaluation-harness style) and the sequences built from them."""

from cl_runner.tasks.spec import Example, Task, load_task, load_task_sequence

__all__ = ["Example", "Task", "load_task", "load_task_sequence"]
