"""The one training loop: it owns batching, the optimizer step, accumulation, precision and device.

Methods never step the optimizer; they only contribute ``extra_loss`` terms and choose which
parameters train. Batches are grouped by length (like ``group_by_length`` in HF Trainer) so
little compute is spent on padding, the vocabulary projection runs only where there is a
label (:func:`answer_token_loss`), and throughput is reported in non-padding tokens/s.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cl_runner.errors import UserError
from cl_runner.formatting import IGNORE_INDEX, TokenizedExample

PRECISIONS = ("fp32", "bf16", "fp16")


def length_grouped_batches(lengths: Sequence[int], batch_size: int, rng: random.Random, window: int = 32) -> list[list[int]]:
    """Shuffle, then sort inside windows of ``window`` batches so each batch holds similar lengths.

    The batch order is shuffled again, so training still sees tasks' examples in random order.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad_right(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences into one tensor; also return the attention mask (1 = real token)."""
    width = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        padded[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return padded, mask


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label IGNORE_INDEX."""
    input_ids, attention_mask = pad_right([e.input_ids for e in examples], pad_token_id)
    labels, _ = pad_right([e.labels for e in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


@dataclass
class LossOutput:
    """What ``extra_loss`` receives: the answer-token cross-entropy and the decoder's last hidden states."""

    loss: torch.Tensor
    last_hidden_state: torch.Tensor


def answer_token_loss(model, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Mean next-token cross-entropy over the labelled (answer) positions.

    The same number as ``model(**batch).loss``, but the vocabulary projection runs only at the
    few labelled positions instead of every prompt token: for short answers after long prompts
    (every continual-learning task here) that skips most of the LM head's compute, forward and
    backward. Falls back to the model's own loss when it does not expose a decoder and a head.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    if decoder is None or head is None or decoder is base:
        outputs = model(**batch, output_hidden_states=True)
        return LossOutput(outputs.loss, outputs.hidden_states[-1])
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])
    return LossOutput(F.cross_entropy(logits.float(), targets[keep]), hidden)


def check_trainer_config(cfg) -> None:
    """Reject impossible trainer settings before anything runs (and before a run directory is written)."""
    if cfg.precision not in PRECISIONS:
        raise UserError(f"trainer.precision '{cfg.precision}' is not one of {list(PRECISIONS)}")
    for key in ("batch_size", "grad_accum_steps", "epochs", "log_every", "max_length"):
        require_setting(cfg, key, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    require_setting(cfg, "max_steps", lambda v: v is None or (isinstance(v, int) and v >= 1), "null or a positive integer")
    require_setting(cfg, "lr", lambda v: isinstance(v, (int, float)) and v > 0, "a positive number")
    require_setting(cfg, "warmup_ratio", lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)")
    require_setting(cfg, "weight_decay", lambda v: isinstance(v, (int, float)) and v >= 0, "a non-negative number")
    require_setting(cfg, "max_grad_norm", lambda v: v is None or (isinstance(v, (int, float)) and v > 0), "null or a positive number")


def require_setting(cfg, key: str, valid, meaning: str, group: str = "trainer") -> None:
    """Raise a one-line UserError unless ``valid(cfg[key])``."""
    if not valid(cfg[key]):
        raise UserError(f"{group}.{key} must be {meaning}, got {cfg[key]!r}")


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then linear decay to zero."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


class TrainingLoop:
    """Trains one task. Configured by the ``trainer`` config group (see conf/config.yaml)."""

    def __init__(self, cfg, device: torch.device, pad_token_id: int, on_step: Callable[[dict], None] | None = None):
        self.cfg = cfg
        self.device = device
        self.pad_token_id = pad_token_id
        self.on_step = on_step or (lambda record: None)

    def _batches(self, examples: Sequence[TokenizedExample], rng: random.Random) -> list[list[TokenizedExample]]:
        lengths = [len(e.input_ids) for e in examples]
        batches = []
        for _ in range(self.cfg.epochs):
            if self.cfg.group_by_length:
                index_batches = length_grouped_batches(lengths, self.cfg.batch_size, rng)
            else:
                order = list(range(len(examples)))
                rng.shuffle(order)
                index_batches = [order[i : i + self.cfg.batch_size] for i in range(0, len(order), self.cfg.batch_size)]
            batches.extend([examples[i] for i in idx] for idx in index_batches)
        return batches

    def train(self, model, parameters, examples, method, replay, seed: int, task_name: str = "") -> dict:
        """Run the configured epochs (or ``max_steps`` optimizer steps) over ``examples``."""
        cfg = self.cfg
        rng = random.Random(seed)
        torch.manual_seed(seed)  # dropout masks: a resumed task repeats an uninterrupted one exactly
        micro_batches = self._batches(examples, rng)
        accum = max(1, cfg.grad_accum_steps)
        total_steps = math.ceil(len(micro_batches) / accum)
        if cfg.max_steps:  # validated: null or a positive integer
            total_steps = min(total_steps, cfg.max_steps)
            micro_batches = micro_batches[: total_steps * accum]
        parameters = [p for p in parameters if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(int(cfg.warmup_ratio * total_steps), total_steps))
        use_scaler = cfg.precision == "fp16" and self.device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        model.train()
        tokens, started, step = 0, time.perf_counter(), 0
        progress = tqdm(total=total_steps, desc=f"train {task_name}", leave=False, disable=not cfg.progress_bar, dynamic_ncols=True)
        for index, micro in enumerate(micro_batches):
            micro = list(micro) + replay.sample(len(micro), rng)
            batch = {k: v.to(self.device) for k, v in collate(micro, self.pad_token_id).items()}
            with autocast_context(cfg.precision, self.device):
                outputs = answer_token_loss(model, batch)
                loss = outputs.loss
                extra = method.extra_loss(model, batch, outputs)
                if extra is not None:
                    loss = loss + extra
            group_size = min(accum, len(micro_batches) - (index // accum) * accum)  # the last group may be short
            scaler.scale(loss / group_size).backward()
            tokens += int(batch["attention_mask"].sum())
            if (index + 1) % accum and index + 1 != len(micro_batches):
                continue
            scaler.unscale_(optimizer)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(parameters, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = schedule.get_last_lr()[0]
            schedule.step()
            step += 1
            elapsed = time.perf_counter() - started
            record = {"step": step, "loss": float(loss.detach()), "lr": lr, "tokens": tokens, "tokens_per_s": tokens / elapsed}
            progress.update(1)
            progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if step % cfg.log_every == 0 or step == total_steps:
                self.on_step(record)
        progress.close()
        elapsed = time.perf_counter() - started
        return {"steps": step, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9), "final_loss": record["loss"] if step else None}
