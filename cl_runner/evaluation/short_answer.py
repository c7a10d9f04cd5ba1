"""Suites scored on short generated answers: knowledge retention and arithmetic word problems.

- ``KnowledgeRetentionSuite``: fact questions (40 built-in, hand-written: capitals, science,
  authors, geography). At setup the base model answers them; the facts it answers correctly
  (the normalised answer appears as whole words in its reply) are the set it knows. Each row
  scores ``retained``: the share of that set still answered correctly (1 for the base model),
  and ``known``: how many facts the set holds. With no known fact, ``retained`` is null.
- ``ArithmeticSuite``: word problems with one exact integer answer, generated from a seed
  (sums, differences, products of small numbers in everyday wording). ``accuracy``: the last
  integer in the reply equals the answer.
"""

from __future__ import annotations

import random
import re

from cl_runner.errors import UserError
from cl_runner.evaluation.generation import generate
from cl_runner.evaluation.suites import suite_records
from cl_runner.evaluation.text_metrics import contains
from cl_runner.tasks import Example

def _answers(model, formatter, members, examples, max_new_tokens: int, batch_size: int, device) -> list[list[str]]:
    """Each member's greedy replies."""
    replies = []
    for member in members:
        with member():
            replies.append(generate(model, formatter, examples, max_new_tokens, batch_size, device))
    return replies


class KnowledgeRetentionSuite:
    headline = "retained"

    def __init__(self, data: str = "builtin", size: int | None = None, max_new_tokens: int = 16):
        self.examples = suite_records("knowledge_retention", data, "knowledge_facts.jsonl", lambda r: Example(str(r["question"]), str(r["answer"])), size)
        self.max_new_tokens = max_new_tokens
        self.known: list[Example] = []

    def setup(self, model, formatter, members, device, batch_size: int) -> None:
        """The facts the base model answers correctly: the set whose retention each row measures."""
        [replies] = _answers(model, formatter, members[:1], self.examples, self.max_new_tokens, batch_size, device)
        self.known = [e for e, reply in zip(self.examples, replies) if contains(reply, e.target)]

    def setup_generation_requests(self) -> list[tuple[Example, int]]:
        return [(e, self.max_new_tokens) for e in self.examples]

    def generation_requests(self) -> list[tuple[Example, int]]:
        """The greedy answers ``score`` will ask for (the runner may decode them ahead, with other suites')."""
        return [(e, self.max_new_tokens) for e in self.known]

    def score(self, model, formatter, members, device, batch_size: int) -> dict[str, float | None]:
        if not self.known:
            return {"retained": None, "known": 0.0}
        per_member = _answers(model, formatter, members, self.known, self.max_new_tokens, batch_size, device)
        retained = [sum(contains(r, e.target) for r, e in zip(replies, self.known)) / len(self.known) for replies in per_member]
        return {"retained": sum(retained) / len(retained), "known": float(len(self.known))}


WORD_PROBLEMS = [  # (template, answer from a and b)
    ("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", lambda a, b: a + b),
    ("A shelf holds {a} books. {name} takes away {b} of them. How many books are left on the shelf?", lambda a, b: a - b),
    ("{name} buys {a} boxes with {b} pencils in each box. How many pencils does {name} buy?", lambda a, b: a * b),
    ("There are {a} birds on a tree and {b} more land on it. How many birds are on the tree?", lambda a, b: a + b),
    ("{name} had {a} coins and spent {b} of them. How many coins does {name} have left?", lambda a, b: a - b),
    ("A class has {a} rows of desks with {b} desks in each row. How many desks are there?", lambda a, b: a * b),
]
NAMES = ["Tom", "Ana", "Lee", "Sara", "Omar", "Mia"]


def word_problems(count: int, seed: int = 0) -> list[Example]:
    """``count`` problems drawn from the templates with numbers from a seeded generator (a >= b, so no negative answers)."""
    rng = random.Random(seed)
    problems = []
    for index in range(count):
        template, answer = WORD_PROBLEMS[index % len(WORD_PROBLEMS)]
        a, b = sorted((rng.randint(2, 12), rng.randint(2, 12)), reverse=True)
        question = template.format(name=rng.choice(NAMES), a=a, b=b) + " Answer with the number."
        problems.append(Example(question, str(answer(a, b))))
    return problems


def last_integer(text: str) -> str | None:
    numbers = re.findall(r"-?\d+", text.replace(",", ""))
    return numbers[-1].lstrip("+") if numbers else None


class ArithmeticSuite:
    headline = "accuracy"

    def __init__(self, size: int = 12, seed: int = 0, max_new_tokens: int = 24):
        if not isinstance(size, int) or size < 1:
            raise UserError(f"eval.suites.arithmetic.size must be a positive integer, got {size!r}")
        self.examples = word_problems(size, seed)
        self.max_new_tokens = max_new_tokens

    def setup(self, model, formatter, members, device, batch_size: int) -> None:
        """Nothing to record on the base model."""

    def generation_requests(self) -> list[tuple[Example, int]]:
        return [(e, self.max_new_tokens) for e in self.examples]

    def score(self, model, formatter, members, device, batch_size: int) -> dict[str, float]:
        per_member = _answers(model, formatter, members, self.examples, self.max_new_tokens, batch_size, device)
        accuracy = [sum(last_integer(r) == e.target for r, e in zip(replies, self.examples)) / len(self.examples) for replies in per_member]
        return {"accuracy": sum(accuracy) / len(accuracy)}
