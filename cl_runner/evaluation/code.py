"""Code: small Python function tasks, scored by running their unit tests on the model's reply.

Ten built-in, hand-written tasks ("Write a Python function add(a, b) ...", with asserts);
``data=`` takes a JSONL file of ``{"entry_point", "prompt", "tests"}``. The reply's code is its
first fenced block (```python ... ```) or, without a fence, the reply itself; the program run
is that code followed by the tests, in the sandbox (``sandbox.py``: a separate process with
CPU, memory, file-size and wall-clock limits, refusing writes outside its folder, processes
and the network). ``pass@1``: the share of tasks whose tests pass with the greedy reply;
``outcomes`` are counted too (``failed``, ``timeout``, ``refused``, ...), as ``outcome/<kind>``.
"""

from __future__ import annotations

import re

from cl_runner.evaluation.generation import generate
from cl_runner.evaluation.sandbox import SandboxLimits, run_program
from cl_runner.evaluation.suites import suite_records
from cl_runner.tasks import Example

OUTCOMES = ("passed", "failed", "timeout", "cpu_limit", "memory_limit", "file_limit", "refused")


def extract_code(reply: str) -> str:
    """The first fenced code block of the reply, or the whole reply."""
    fenced = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", reply, flags=re.DOTALL)
    return fenced.group(1) if fenced else reply


class CodeSuite:
    headline = "pass@1"

    def __init__(self, data: str = "builtin", size: int | None = None, max_new_tokens: int = 96, timeout_s: float = 5.0, memory_mb: int = 512):
        self.tasks = suite_records("code", data, "code_tasks.jsonl", lambda r: (Example(str(r["prompt"]), ""), str(r["tests"])), size)
        self.max_new_tokens = max_new_tokens
        self.limits = SandboxLimits(wall_s=timeout_s, cpu_s=max(1, int(timeout_s)), memory_mb=memory_mb)

    def setup(self, model, formatter, members, device, batch_size: int) -> None:
        """Nothing to record on the base model."""

    def generation_requests(self) -> list[tuple[Example, int]]:
        """The greedy answers ``score`` will ask for (the runner may decode them ahead, with other suites')."""
        return [(example, self.max_new_tokens) for example, _ in self.tasks]

    def score(self, model, formatter, members, device, batch_size: int) -> dict[str, float]:
        counts = dict.fromkeys(OUTCOMES, 0)
        for member in members:
            with member():
                replies = generate(model, formatter, [example for example, _ in self.tasks], self.max_new_tokens, batch_size, device)
            for reply, (_, tests) in zip(replies, self.tasks):
                counts[run_program(extract_code(reply) + "\n\n" + tests + "\n", self.limits).outcome] += 1
        total = len(self.tasks) * len(members)
        return {"pass@1": counts["passed"] / total, **{f"outcome/{kind}": count / total for kind, count in counts.items()}}
