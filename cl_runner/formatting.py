"""Turning prompts and answers into token ids, through the model's chat template when it has one.

Training and evaluation share every decision here, so that what is scored is what is taught:

- the target of an answer is tokenized *in context* and ends with the template's end-of-turn
  marker (``answer_ids``); choice scoring uses exactly these tokens for every choice;
- a document of a text task (continual pre-training) is raw text, no template: it follows a
  document-start token and is cut into windows of ``max_length`` tokens (``document_windows``);
- an over-long prompt is cut in the middle of the user content (``prompt_ids``), keeping BOS,
  the system prompt, the template's header and the start and end of the instruction, with
  the same budget in training and evaluation: ``max_length`` minus the longest answer the
  example can have (its target, each of its choices, or the generation budget).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from cl_runner.errors import UserError
from cl_runner.tasks import Example

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class ChoiceRequest:
    """One multiple-choice item as token ids: the shared prompt and each choice's full target."""

    prompt: list[int]
    choices: list[list[int]]


class PromptFormatter:
    """Encodes a user prompt (and its answer) the way the model expects to see a conversation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True, system_prompt: str | None = None, max_length: int = 512):
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and tokenizer.chat_template)
        self.system_prompt = system_prompt
        self.max_length = max_length
        # Evaluation re-encodes the same items after every task: rendering templates is not free.
        self._prompt_cache: dict[tuple[str, int], list[int]] = {}
        self._answer_cache: dict[tuple[str, str], list[int]] = {}
        self._window_cache: dict[str, list[TokenizedExample]] = {}

    def _messages(self, prompt: str, answer: str | None = None) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])

    def _render_prompt(self, prompt: str) -> list[int]:
        if self.chat:
            return self._chat_ids(self._messages(prompt), add_generation_prompt=True)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def prompt_ids(self, prompt: str, reserve: int = 0) -> list[int]:
        """The prompt's tokens, cut in the middle of the user content to leave ``reserve`` tokens for the answer."""
        key = (prompt, reserve)
        if key not in self._prompt_cache:
            self._prompt_cache[key] = self._fit_prompt(prompt, max(1, self.max_length - reserve))
        return list(self._prompt_cache[key])  # a copy: callers may extend it

    def _fit_prompt(self, prompt: str, budget: int) -> list[int]:
        ids = self._render_prompt(prompt)
        if len(ids) <= budget:
            return ids
        content = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        keep = budget - (len(ids) - len(content))  # what the frame (template, BOS, system prompt) leaves
        for _ in range(8):  # re-tokenizing the joined halves can shift the count by a token or two
            if keep < 2:
                break
            head, tail = content[: (keep + 1) // 2], content[len(content) - keep // 2 :]
            decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=False, clean_up_tokenization_spaces=False)  # noqa: E731
            ids = self._render_prompt(decode(head) + decode(tail))
            if len(ids) <= budget:
                return ids
            keep -= len(ids) - budget
        raise UserError(
            f"trainer.max_length={self.max_length} is too small: the prompt's template alone and the longest answer "
            f"leave no room for its text (budget {budget} tokens); raise trainer.max_length"
        )

    def continuation_ids(self, answer: str) -> list[int]:
        """Tokens of an answer on its own, without the end-of-turn marker."""
        text = answer if self.chat else " " + answer
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Tokens the model must produce after the prompt, tokenized in context, end-of-turn marker included."""
        key = (prompt, answer)
        if key not in self._answer_cache:
            self._answer_cache[key] = self._answer_in_context(prompt, answer)
        return list(self._answer_cache[key])

    def _answer_in_context(self, prompt: str, answer: str) -> list[int]:
        if self.chat:
            head = self._chat_ids(self._messages(prompt), add_generation_prompt=True)
            full = self._chat_ids(self._messages(prompt, answer), add_generation_prompt=False)
            if full[: len(head)] == head:
                return full[len(head) :]
            # The template's text after the prompt (answer, end-of-turn marker) when the tokenizer
            # merges across the boundary (e.g. a trailing "\n\n" that becomes one token alone).
            head_text = self._chat_text(self._messages(prompt), add_generation_prompt=True)
            full_text = self._chat_text(self._messages(prompt, answer), add_generation_prompt=False)
            if full_text.startswith(head_text):
                return self.tokenizer(full_text[len(head_text) :], add_special_tokens=False)["input_ids"]
        return self.continuation_ids(answer) + [self.tokenizer.eos_token_id]

    def _chat_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def end_of_turn_ids(self) -> list[int]:
        """Token ids that end the assistant's turn: the EOS token and the template's end-of-turn token."""
        ids = {self.tokenizer.eos_token_id}
        if self.chat:
            # The first special token the template puts after an answer (<|im_end|>, <|eot_id|>, ...).
            special = set(self.tokenizer.all_special_ids)
            ids.update([t for t in self.answer_ids("Hi", "Hello") if t in special][:1])
        return sorted(i for i in ids if i is not None)

    def _reserve(self, example: Example, reserve: int) -> int:
        answers = [example.target, *(example.choices or ())]
        return max(reserve, *(len(self.answer_ids(example.prompt, a)) for a in answers))

    def encode_prompt(self, example: Example, reserve: int = 0) -> list[int]:
        """The example's prompt as training truncates it: room for ``reserve`` tokens, its target and each choice."""
        return self.prompt_ids(example.prompt, self._reserve(example, reserve))

    def encode_example(self, example: Example, reserve: int = 0) -> TokenizedExample:
        """Prompt + target answer for training; labels only on the answer (and its end-of-turn marker)."""
        prompt = self.encode_prompt(example, reserve)
        answer = self.answer_ids(example.prompt, example.target)
        return TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)

    def windows_of(self, document: str) -> list[TokenizedExample]:
        """A text task's document as ``document_windows`` of ``max_length`` tokens (cached, like prompts)."""
        if document not in self._window_cache:
            self._window_cache[document] = document_windows(self.tokenizer, document, self.max_length)
        return self._window_cache[document]

    def encode_choices(self, example: Example) -> ChoiceRequest:
        """The prompt, truncated exactly as in training, and every choice's in-context training target."""
        prompt = self.encode_prompt(example)
        return ChoiceRequest(prompt, [self.answer_ids(example.prompt, c) for c in example.choices])



def document_start_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token a document follows: the tokenizer's BOS where it adds one (Llama), else its EOS,
    as in packed pre-training data where each document comes after the previous one's end."""
    added = tokenizer("", add_special_tokens=True)["input_ids"]
    start = added[0] if added else tokenizer.eos_token_id
    if start is None:
        raise UserError("the tokenizer has neither a BOS token it adds nor an EOS token to start a document with")
    return start


def document_windows(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[TokenizedExample]:
    """A document as consecutive windows, each the start token then up to ``max_length - 1`` of the
    document's tokens, labelled on every document token: the language-modelling loss of training
    and the token log-likelihoods of perplexity. Windows do not overlap: a window's first tokens
    are predicted without the previous window as context (the usual fixed-length evaluation)."""
    start = document_start_id(tokenizer)
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    width = max(1, max_length - 1)
    return [TokenizedExample([start, *tokens[i : i + width]], [IGNORE_INDEX, *tokens[i : i + width]]) for i in range(0, len(tokens), width)]
