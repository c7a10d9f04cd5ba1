"""Turning prompts and answers into token ids, through the model's chat template when it has one."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from cl_runner.tasks import Example

IGNORE_INDEX = -100  # label value that the loss skips (prompt tokens)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class PromptFormatter:
    """Encodes a user prompt (and its answer) the way the model expects to see a conversation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool = True, system_prompt: str | None = None, max_length: int = 512):
        self.tokenizer = tokenizer
        self.chat = bool(use_chat_template and tokenizer.chat_template)
        self.system_prompt = system_prompt
        self.max_length = max_length

    def _messages(self, prompt: str, answer: str | None = None) -> list[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        messages.append({"role": "user", "content": prompt})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _chat_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)
        return list(encoded["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            ids = self._chat_ids(self._messages(prompt), add_generation_prompt=True)
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return ids[-self.max_length :]

    def continuation_ids(self, answer: str) -> list[int]:
        """Tokens of an answer right after the prompt, without the end-of-turn marker (for scoring choices)."""
        text = answer if self.chat else " " + answer
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, prompt: str, answer: str) -> list[int]:
        """Tokens the model must produce after the prompt, end-of-turn marker included (for training)."""
        if self.chat:
            head = self._chat_ids(self._messages(prompt), add_generation_prompt=True)
            full = self._chat_ids(self._messages(prompt, answer), add_generation_prompt=False)
            if full[: len(head)] == head:
                return full[len(head) :]
        return self.continuation_ids(answer) + [self.tokenizer.eos_token_id]

    def encode_example(self, example: Example) -> TokenizedExample:
        prompt = self.prompt_ids(example.prompt)
        answer = self.answer_ids(example.prompt, example.target)
        prompt = prompt[-max(1, self.max_length - len(answer)) :]
        return TokenizedExample(prompt + answer, [IGNORE_INDEX] * len(prompt) + answer)
