"""The one training loop: it owns batching, the optimizer step, accumulation, precision and device.

Methods never step the optimizer; they only contribute ``extra_loss`` terms and choose which
parameters train. An optimizer step over k micro-batches of b examples computes the gradient
of one batch of k*b examples: every answer token of the step has the same weight (replayed
examples together carry ``replay.ratio`` of it), whichever micro-batch it falls in.
Throughput is reported in non-padding tokens/s.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from cl_runner.errors import UserError
from cl_runner.formatting import TokenizedExample
from cl_runner.methods.base import ContinualMethod
from cl_runner.training.batching import BATCH_LAYOUTS, length_grouped_batches, training_batch
from cl_runner.training.gradients import GradientProbe
from cl_runner.training.loss import answer_token_loss, weighted_objective
from cl_runner.distributed import World, broadcast_gradients, sum_gradients, sum_over_ranks
from cl_runner.training.mid_task import MidTaskCheckpoint
from cl_runner.training.precision import PRECISIONS, MasterWeights, autocast_context
from cl_runner.training.sharding import gather_full, local_numel, sharded_training

MixedBatch = tuple[list[TokenizedExample], list[TokenizedExample]]  # (current task, replayed)


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
    require_setting(cfg, "batch_layout", lambda v: v in BATCH_LAYOUTS, f"one of {list(BATCH_LAYOUTS)}")
    require_setting(cfg, "row_tokens", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer")
    require_setting(cfg, "checkpoint_every", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), "null or a positive integer")


def require_setting(cfg, key: str, valid, meaning: str, group: str = "trainer") -> None:
    """Raise a one-line UserError unless ``valid(cfg[key])``."""
    if not valid(cfg[key]):
        raise UserError(f"{group}.{key} must be {meaning}, got {cfg[key]!r}")


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then linear decay to zero."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return multiplier


def step_token_weights(step: Sequence[MixedBatch], replay_share: float) -> tuple[float, float]:
    """Loss weight of one answer token of the current task and of a replayed example, for one optimizer step.

    Every token of a kind weighs the same across the step's micro-batches, so accumulation
    equals one bigger batch; replayed tokens together weigh ``replay_share``, task tokens the rest.
    """
    task_tokens = sum(e.num_target_tokens for current, _ in step for e in current)
    replay_tokens = sum(e.num_target_tokens for _, replayed in step for e in replayed)
    if replay_tokens == 0:
        return 1.0 / max(task_tokens, 1), 0.0
    if task_tokens == 0:
        return 0.0, 1.0 / replay_tokens
    return (1.0 - replay_share) / task_tokens, replay_share / replay_tokens


class TrainingLoop:
    """Trains one task. Configured by the ``trainer`` config group (see conf/config.yaml)."""

    def __init__(self, cfg, device: torch.device, pad_token_id: int, on_step: Callable[[dict], None] | None = None, world: World = World()):
        self.cfg = cfg
        self.device = device
        self.pad_token_id = pad_token_id
        self.on_step = on_step or (lambda record: None)
        self.world = world  # data parallelism: each rank trains on its share of every global micro-batch

    def _batches(self, examples: Sequence[TokenizedExample], rng: random.Random) -> list[list[TokenizedExample]]:
        lengths = [len(e.input_ids) for e in examples]
        batches = []
        size = self.cfg.batch_size * self.world.size  # the global micro-batch: every rank draws the same ones
        for _ in range(self.cfg.epochs):
            if self.cfg.group_by_length:
                index_batches = length_grouped_batches(lengths, size, rng)
            else:
                order = list(range(len(examples)))
                rng.shuffle(order)
                index_batches = [order[i : i + size] for i in range(0, len(order), size)]
            batches.extend([examples[i] for i in idx] for idx in index_batches)
        return batches

    def probe(self, model, parameters) -> GradientProbe:
        """Gradients of other examples' loss with respect to ``parameters``, batched and cast as training is."""
        return GradientProbe(model, parameters, self.pad_token_id, self.device, self.cfg.precision, self.cfg.batch_size,
                             self.cfg.get("batch_layout", "padded"), self.cfg.get("row_tokens", 1024))

    def micro_step(self, model, method, current, replayed, weights: tuple[float, float], micro_batches_in_step: int, scaler,
                   ranks_sharing: int = 1, stand_in: TokenizedExample | None = None) -> float:
        """Forward and backward of one micro-batch; returns its contribution to the step's loss.

        ``ranks_sharing``: how many ranks got part of this micro-batch (each adds the
        once-per-step terms, so each adds its share of them). A rank whose share is empty
        skips the micro-batch, unless the model is sharded: then every rank must run the
        layers' all-gathers and reduce-scatters, so it runs ``stand_in`` with weight zero."""
        examples = list(current) + list(replayed)
        if not examples and stand_in is None:  # this rank's share of a short last micro-batch
            return 0.0
        per_example = [weights[0]] * len(current) + [weights[1]] * len(replayed)
        standing_in = not examples
        if standing_in:
            examples, per_example = [stand_in], [0.0]
        batch = training_batch(model, examples, per_example, self.pad_token_id, self.cfg.get("batch_layout", "padded"), self.cfg.get("row_tokens", 1024))
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with autocast_context(self.cfg.precision, self.device):
            outputs = answer_token_loss(model, batch)
            loss = weighted_objective(outputs, batch)
            # Terms that are not sums over tokens (regularisers, router losses) enter once per step.
            for term in (outputs.aux_loss, method.extra_loss(model, batch, outputs)):
                if term is not None:
                    loss = loss + term / (micro_batches_in_step * ranks_sharing)
            if standing_in:
                loss = loss * 0.0  # in the graph, so the collectives run; adds nothing to any gradient
        scaler.scale(loss).backward()
        return float(loss.detach())

    def accumulate(self, model, method, mixed: Sequence[MixedBatch], replay_share: float, scaler, masters: MasterWeights | None = None,
                   sharded: bool = False) -> float:
        """Forward and backward of one optimizer step's micro-batches; returns the step's loss.

        The gradient is that of one batch holding all of them (token-weighted, see
        ``step_token_weights``), summed in fp32 when the weights are not. ``sharded``: FSDP
        reduces the gradients itself, and every rank must run every micro-batch.
        """
        weights = step_token_weights(mixed, replay_share)  # over the global step, so every rank weighs tokens alike
        step_loss = 0.0
        for current, replayed in mixed:
            sharing = min(self.world.size, max(len(current), len(replayed)))  # a rank past both lists' ends gets nothing
            stand_in = (current or replayed)[0] if sharded else None
            step_loss += self.micro_step(model, method, self.world.share(current), self.world.share(replayed), weights, len(mixed), scaler, sharing, stand_in)
            if masters is not None:
                masters.gradients_to_master()
        if masters is not None and not sharded:
            sum_gradients(masters.parameters, self.world)
        return sum_over_ranks(step_loss, self.world)

    def train(self, model, parameters, examples, method, replay, seed: int, task_name: str = "", checkpoint: MidTaskCheckpoint | None = None) -> dict:
        """Run the configured epochs (or ``max_steps`` optimizer steps) over ``examples``.

        With a ``checkpoint``, the task continues from the state it saved (if any) and saves
        its state every ``checkpoint.every`` steps (:mod:`cl_runner.training.mid_task`).
        Under ``trainer.sharding=fsdp`` (and more than one rank) the model is sharded while it
        trains and whole again afterwards (:mod:`cl_runner.training.sharding`).
        """
        if self.cfg.get("sharding", "none") != "fsdp" or self.world.size == 1:
            return self._train(model, parameters, examples, method, replay, seed, task_name, checkpoint)
        with sharded_training(model, parameters) as (sharded, sharded_params):
            return self._train(sharded, sharded_params, examples, method, replay, seed, task_name, checkpoint, sharded=True)

    def _train(self, model, parameters, examples, method, replay, seed: int, task_name: str, checkpoint: MidTaskCheckpoint | None,
               sharded: bool = False) -> dict:
        cfg = self.cfg
        rng = random.Random(seed)
        torch.manual_seed(seed)  # dropout masks: a resumed task repeats an uninterrupted one exactly
        micro_batches = self._batches(examples, rng)
        accum = max(1, cfg.grad_accum_steps)
        steps = [micro_batches[i : i + accum] for i in range(0, len(micro_batches), accum)]  # the last may be short
        if cfg.max_steps:  # validated: null or a positive integer
            steps = steps[: cfg.max_steps]
        masters = MasterWeights([p for p in parameters if p.requires_grad])
        optimizer = torch.optim.AdamW(masters.parameters, lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(int(cfg.warmup_ratio * len(steps)), len(steps)))
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16" or masters.has_fp16)
        replay_share = float(getattr(replay, "ratio", 0.0))
        probe = self.probe(model, [model_param for model_param, _ in masters.pairs])  # gradients come back in fp32, as the masters'
        model.train()
        tokens, started, record, done = 0, time.perf_counter(), {}, 0
        saved = checkpoint.load() if checkpoint is not None else None
        # A rank that could not read the file (a flaky shared file system) would train other steps
        # than the others, and their collectives would no longer line up: stop instead.
        self.world.check_same(saved["step"] if saved is not None else 0, "the step a mid-task checkpoint resumes from")
        if saved is not None:
            done, tokens, started = checkpoint.restore(saved, masters, optimizer, schedule, scaler, rng)
        progress = tqdm(total=len(steps), initial=done, desc=f"train {task_name}", leave=False, disable=not cfg.progress_bar or not self.world.is_main, dynamic_ncols=True)
        for step_index, step in enumerate(steps, start=1):
            if step_index <= done:  # trained before the interruption; the data order is the same
                continue
            mixed = [(micro, replay.sample(len(micro), rng)) for micro in step]
            step_loss = self.accumulate(model, method, mixed, replay_share, scaler, masters, sharded)
            tokens += sum(len(e.input_ids) for current, replayed in mixed for e in (*current, *replayed))
            scaler.unscale_(optimizer)
            if type(method).adjust_gradients is not ContinualMethod.adjust_gradients:
                method.adjust_gradients(model, masters.parameters, probe, step_index)
                broadcast_gradients(masters.parameters, self.world)  # every rank steps with rank 0's adjusted gradient
            grad_norm = None
            if cfg.max_grad_norm:
                grad_norm = float(gather_full(torch.nn.utils.clip_grad_norm_(masters.parameters, cfg.max_grad_norm)))  # before clipping
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            masters.master_to_model()
            lr = schedule.get_last_lr()[0]
            schedule.step()
            record = {"step": step_index, "loss": step_loss, "lr": lr, "tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - started)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            record.update(method.step_report() or {})
            if scaler.is_enabled():
                record["loss_scale"] = scaler.get_scale()  # falls when fp16 gradients overflow (those steps are skipped)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if checkpoint is not None and checkpoint.due(step_index, len(steps)):
                checkpoint.save(step_index, tokens, time.perf_counter() - started, masters, optimizer, schedule, scaler, rng)
            if step_index % cfg.log_every == 0 or step_index == len(steps):
                self.on_step(record)
        progress.close()
        elapsed = time.perf_counter() - started
        return {"steps": len(steps), "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9), "final_loss": record.get("loss"),
                "optimizer_elements_per_rank": sum(local_numel(p) for p in masters.parameters)}  # what this rank's optimizer steps (a shard under FSDP)
