"""The runner: the one place that orders train, evaluate, checkpoint and resume.

    R[0]   = every task scored by the base model
    for each task t of the sequence (skipping those a previous invocation completed):
        method.before_task -> method.learn (the training loop) -> method.after_task
        R[t] = every task scored again; the general probe too
        checkpoint, then state.json (atomically)
    results.json, heatmap, logger summary
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue
from tqdm.auto import tqdm

from cl_runner.config import build
from cl_runner.distributed import World, current_world
from cl_runner.error_file import clear_error_file, write_error_file
from cl_runner.errors import UserError
from cl_runner.methods.base import ContinualMethod
from cl_runner.editing.locality import attach_locality_references
from cl_runner.evaluation import CHOICE_METRICS, evaluate_task, evaluate_tasks
from cl_runner.evaluation.fluency import fluency_settings, generation_fluency
from cl_runner.evaluation.generation import use_decoded
from cl_runner.evaluation.suites import build_suites, decode_for_row, generation_requests, score_suite, scores_row, setup_suite
from cl_runner.formatting import PromptFormatter, document_windows
from cl_runner.loggers import NullLogger
from cl_runner.models import load_model, resolve_device
from cl_runner.atomic_io import write_json_atomic
from cl_runner.plots import plot_abilities, plot_heatmap
from cl_runner.provenance import invocation_record
from cl_runner.resources import PeakMemory, parameter_count
from cl_runner.results import build_results
from cl_runner.run_lock import RunLock
from cl_runner.run_state import RunState, Row, result_settings
from cl_runner.tasks import Task, load_task_sequence
from cl_runner.tasks.spec import LOWER_IS_BETTER
from cl_runner.training import TrainingLoop, check_trainer_config, require_setting
from cl_runner.training.sharding import check_shardable, check_sharding
from cl_runner.training.batching import input_batches
from cl_runner.training.mid_task import MidTaskCheckpoint

log = logging.getLogger("cl_runner")


class EventLog:
    """``train_log.jsonl``: one JSON object per line, per training step and per evaluation row.

    The logger receives each record with its line number as ``step``: the file only grows,
    so steps keep increasing across invocations and a resumed run stays one W&B run.
    """

    def __init__(self, path: Path, logger, writer: bool = True):
        self.path = path
        self.logger = logger
        self.writer = writer  # False on data-parallel ranks other than 0
        self.lines = 0
        # A run killed mid-write leaves a partial last line: end it so the next record starts clean.
        if writer and path.exists() and path.stat().st_size:
            with path.open("rb+") as handle:
                handle.seek(-1, 2)  # only the last byte matters; the log can be large
                if handle.read(1) != b"\n":
                    handle.write(b"\n")
            with path.open("rb") as handle:
                self.lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))

    def write(self, event: dict) -> int:
        """Append ``event``; return its line number (0-based)."""
        if self.writer:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(event) + "\n")
        self.lines += 1
        return self.lines - 1

    def step(self, task_name: str, record: dict) -> None:
        line = self.write({"event": "train_step", "task": task_name, **record})
        self.logger.log_step(record, task_name, step=line)

    def evaluation(self, tasks_learnt: int, task_names: list[str], row: Row) -> None:
        event = {"event": "eval", "tasks_learnt": tasks_learnt, "scores": dict(zip(task_names, row.scores)), "general_probe": row.general}
        if row.fluency is not None:
            event["fluency"] = row.fluency
        if row.abilities:
            event["abilities"] = row.abilities
        event["task_scores"] = dict(zip(task_names, row.task_scores))
        if row.report is not None:
            event["method_report"] = row.report
        line = self.write(event)
        extra = {"fluency": row.fluency}
        extra.update({f"ability/{suite}/{key}": value for suite, scores in (row.abilities or {}).items() for key, value in scores.items()})
        self.logger.log_evaluation(tasks_learnt, task_names, row.scores, row.general, row.task_scores, step=line, extra=extra)


def resolved_config(cfg: DictConfig) -> dict:
    """The config as plain data; a required value left unset (``???``) is a user error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as exc:
        # The message names the unset key; a direct miss carries its full dotted path in full_key.
        key = str(exc).splitlines()[0].rsplit(": ", 1)[-1]
        key = key if "." in key else (getattr(exc, "full_key", None) or key)
        raise UserError(f"config value '{key}' is required but not set: pass {key}=... on the command line") from exc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _format_row(scores: list[float]) -> str:
    return "[" + " ".join(f"{s:.2f}" for s in scores) + "]"


def _format_score(score: float | None, spec: str = ".2f") -> str:
    return "-" if score is None else format(score, spec)


class Experiment:
    """One run: built from the config, then driven by :meth:`run`."""

    def __init__(self, cfg: DictConfig, run_dir: Path, world: World = World(), rescoring: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.world = world  # under torchrun: the ranks train together, only rank 0 writes
        self.config = resolved_config(cfg)
        check_trainer_config(cfg.trainer)
        require_setting(cfg.eval, "batch_size", lambda v: isinstance(v, int) and v >= 1, "a positive integer", group="eval")
        self.device = world.device(resolve_device(cfg.trainer.device))
        # Data first: a bad task file fails here, before anything is written to the run directory.
        self.tasks, self.probe = load_task_sequence(self.config["task_sequence"])
        self.task_names = [t.name for t in self.tasks]
        # Settings next: a bad method, replay or logger setting fails before the model is loaded.
        self.method = build(cfg.method, "method")
        check_sharding(cfg.trainer.get("sharding", "none"), self.method, cfg.trainer.precision)
        self.replay = build(cfg.replay, "replay")
        self.logger = build(cfg.logger, "logger") if world.is_main else NullLogger()
        self.suites = build_suites(self.config["eval"].get("suites"))
        # Decoding one token costs about as much for 16 prompts as for 64 (CPU and GPU alike), so generation batches are larger.
        self.decode_batch = self.config["eval"].get("generation_batch_size") or cfg.eval.batch_size
        self._check_rollback()
        self.fluency_prompts, self.fluency_tokens = fluency_settings(self.config["task_sequence"], self.tasks)
        self.replay_tasks = self.replay.data_tasks(list(cfg.task_sequence.task_dirs))
        fingerprints = {t.name: t.fingerprint() for t in [*self.tasks, *([self.probe] if self.probe else [])]}
        fingerprints.update({f"replay/{t.name}": t.fingerprint() for t in self.replay_tasks})
        # Re-scoring a stored run (rescore) may change what is evaluated, nothing else.
        self.state = RunState.open(run_dir, result_settings(self.config), self.task_names, fingerprints, ("eval.",) if rescoring else ())
        self.state.writer = world.is_main
        self.timing: dict = {}
        self._encoded: dict[str, list] = {}

    @property
    def lower_is_better(self) -> bool:
        """The sequence's tasks are scored by perplexity (load_task_sequence refuses a mix)."""
        return any(task.metric in LOWER_IS_BETTER for task in self.tasks)

    def _check_rollback(self) -> None:
        names = list(self.cfg.get("rollback") or [])
        unknown = [n for n in names if n not in self.task_names]
        if unknown:
            raise UserError(f"rollback: no task named {unknown} in this sequence ({self.task_names})")
        if names and type(self.method).rollback is ContinualMethod.rollback:
            raise UserError(f"rollback: method {self.cfg.method.name} cannot roll tasks back (editors can: rome, memit, alphaedit)")

    def task_seed(self, task_index: int) -> int:
        return self.cfg.seed * 1000 + task_index

    def _encode(self, task: Task) -> list:
        if task.name not in self._encoded:
            self._encoded[task.name] = self._training_examples(task)
        return self._encoded[task.name]

    def _training_examples(self, task: Task) -> list:
        if task.type == "text":  # documents: the language-modelling loss on every token, window by window
            # Not through the formatter's window cache: that keeps every document's windows for the
            # whole run, and only test documents are cut again (each row's perplexity).
            tokenizer, width = self.formatter.tokenizer, self.formatter.max_length
            return [w for e in task.train for w in document_windows(tokenizer, e.target, width)]
        formatter = self.raw_formatter if task.type == "edit" else self.formatter  # edits complete raw text
        return [formatter.encode_example(e, task.answer_reserve) for e in task.train]

    def _build_model(self):
        """The base model with the method set up on it (as before the first task); returns the tokenizer."""
        model, tokenizer = load_model(self.cfg.model)
        self.formatter = PromptFormatter(tokenizer, self.cfg.model.use_chat_template, self.cfg.model.system_prompt, self.cfg.trainer.max_length)
        # Seeded right before the method draws its adapter initialisation: loading may or may
        # not consume random numbers (a first run builds the cached model, later runs do not).
        seed_everything(self.cfg.seed)
        self.model = self.method.setup(model).to(self.device)
        if self.cfg.trainer.get("sharding", "none") == "fsdp" and self.world.size > 1:
            check_shardable(self.model)
        self.method.use_tokenizer(tokenizer)
        return tokenizer

    def _setup(self) -> None:
        started = time.perf_counter()
        tokenizer = self._build_model()
        # Knowledge edits are completions of raw text ("The capital of France is"), not chat turns.
        self.raw_formatter = PromptFormatter(tokenizer, False, None, self.cfg.trainer.max_length)
        # EasyEdit's locality compares with the unedited model's tokens: taken now, before a resumed run loads its checkpoints.
        base = lambda index: self.method.eval_members(self.model, 0, index)[0]  # noqa: E731
        attach_locality_references(self.model, tokenizer, self.tasks, base, self.cfg.eval.batch_size)
        self.base_answers = self._setup_suites()  # also before the checkpoints load: what the base model does
        self.replay.setup(self._encode, self.replay_tasks)
        self.events = EventLog(self.run_dir / "train_log.jsonl", self.logger, writer=self.world.is_main)
        self.loop = TrainingLoop(self.cfg.trainer, self.device, tokenizer.pad_token_id, world=self.world)
        if self.state.tasks_completed:
            self.method.load_checkpoint(self.model, self.state.completed_checkpoints())
            for t in range(self.state.tasks_completed):
                self.replay.add_task(t, self._encode(self.tasks[t]))
            log.info("Resuming %s after task %d/%d (%s)", self.run_dir, self.state.tasks_completed, len(self.tasks), self.task_names[self.state.tasks_completed - 1])
        self.timing["setup_s"] = time.perf_counter() - started

    def _evaluate_row(self, tasks_learnt: int) -> Row:
        started = time.perf_counter()

        def members_of(task_index):
            return self.method.eval_members(self.model, tasks_learnt, task_index)

        def router_of(task_index):
            return lambda prompts: self.method.route_examples(self.model, tasks_learnt, task_index, prompts)

        desc = "eval base" if tasks_learnt == 0 else f"eval after {self.task_names[tasks_learnt - 1]}"
        task_scores = self._score_tasks(members_of, router_of, desc)
        scores = [s[task.metric] for s, task in zip(task_scores, self.tasks)]
        # The probe and fluency measure the model as deployed after the sequence: the last-learnt weights.
        deployed = lambda: members_of(max(0, tasks_learnt - 1))  # noqa: E731
        extras = []
        if self.probe is not None:
            extras.append(lambda: evaluate_task(self.model, self.formatter, self.probe, self.cfg.eval.batch_size, self.device, deployed(), router_of(None),
                                                self.decode_batch)[self.probe.metric])
        if self.fluency_prompts:
            extras.append(lambda: generation_fluency(self.model, self.raw_formatter, self.fluency_prompts, self.fluency_tokens, self.decode_batch, self.device, deployed()))
        suites = self._suites_at(tasks_learnt)
        for suite in suites.values():
            extras.append(lambda suite=suite: score_suite(suite, self.model, self.formatter, deployed(), self.device, self.decode_batch))
        with use_decoded(self._decoded_ahead(deployed(), tasks_learnt, suites.values())):
            answers = iter(self.world.run_shared(extras))
        general = next(answers) if self.probe is not None else None
        fluency = next(answers) if self.fluency_prompts else None
        abilities = {name: next(answers) for name in suites} or None
        report = self.world.merge_reports(self.method.row_report(tasks_learnt))  # each rank saw the tasks it scored
        row = Row(scores, task_scores, general, time.perf_counter() - started, report, fluency, abilities)
        self.events.evaluation(tasks_learnt, self.task_names, row)
        return row

    def _setup_suites(self) -> dict:
        """Each suite's setup on the base model; returns the base answers it decoded (row 0 asks for them again)."""
        base_members = self.method.eval_members(self.model, 0, 0)
        base_answers = self._decode_together(base_members, generation_requests(self.suites.values(), at_setup=True))
        with use_decoded(base_answers):
            for suite in self.suites.values():
                setup_suite(suite, self.model, self.formatter, base_members, self.device, self.decode_batch)
        return base_answers

    def _suites_at(self, row: int) -> dict:
        """The suites scored on ``row`` (most score every row)."""
        return {name: suite for name, suite in self.suites.items() if scores_row(suite, row, len(self.tasks) + 1)}

    def _decoded_ahead(self, members, tasks_learnt: int, suites) -> dict:
        """The probe's and the suites' greedy answers for a row, decoded together in shared batches."""
        requests = generation_requests(suites)
        if self.probe is not None and self.probe.metric not in CHOICE_METRICS:
            requests += [(example, self.probe.answer_reserve) for example in self.probe.test]
        known = self.base_answers if tasks_learnt == 0 else {}  # row 0 is the base model: what setup decoded stands
        return {**known, **self._decode_together(members, requests, skip=known)}

    def _decode_together(self, members, requests, skip: dict | None = None) -> dict:
        """``decode_for_row`` when one model answers in one process (ensembles and data-parallel ranks decode per call)."""
        if len(members) != 1 or self.world.size > 1 or not requests:
            return {}
        return decode_for_row(self.model, self.formatter, members[0], requests, self.decode_batch, self.device, skip or {})

    def _score_tasks(self, members_of, router_of, desc: str) -> list[dict]:
        """Every task's scores; under data parallelism each rank scores its share of the tasks."""

        def score(indices: list[int]) -> list[dict]:
            return evaluate_tasks(self.model, self.formatter, [self.tasks[i] for i in indices], self.cfg.eval.batch_size, self.device,
                                  lambda j: members_of(indices[j]), desc, self.cfg.eval.progress_bar and self.world.is_main,
                                  router_of and (lambda j: router_of(indices[j])), self.decode_batch)

        return self.world.map_shared(len(self.tasks), score)

    def mid_task(self, t: int) -> MidTaskCheckpoint:
        return MidTaskCheckpoint(self.state.checkpoint_root / "in_progress.pt", t, self.cfg.trainer.get("checkpoint_every"), writer=self.world.is_main)

    def _learn_task(self, t: int) -> dict:
        task = self.tasks[t]
        # Seed per task, not per process: a resumed run must draw what an uninterrupted one
        # draws (a new adapter's initialisation in before_task, dropout, data order).
        seed_everything(self.task_seed(t))
        examples = self._encode(task)
        # A text task has no prompt: what the model is given (CoLoR's prototypes, the router at test time) is the document.
        task.input_batches = lambda prompts_only=False: input_batches(examples, self.cfg.eval.batch_size, self.device, prompts_only and task.type != "text")
        trained: dict = {}

        def train(task_indices: list[int] | str | None = None) -> dict:
            """The shared loop on this task's examples, or on those of ``task_indices`` ("all": every task
            of the sequence, as the runner expanded it) together: joint training."""
            if task_indices == "all":
                task_indices = range(len(self.tasks))
            data = examples if task_indices is None else [e for i in task_indices for e in self._encode(self.tasks[i])]
            self.loop.on_step = lambda record: self.events.step(task.name, record)
            params = list(self.method.trainable_parameters(self.model))
            trained["trainable_parameters"] = parameter_count(params)
            return self.loop.train(self.model, params, data, self.method, self.replay, seed=self.task_seed(t), task_name=task.name, checkpoint=self.mid_task(t))

        # A method that learns without the training loop (an editor) logs its own steps with this.
        train.log_step = lambda record: self.events.step(task.name, record)

        with PeakMemory(self.device) as peak:  # what the method does around training counts too
            self.method.before_task(self.model, t, task)
            stats = self.method.learn(self.model, t, task, train)
            self.method.after_task(self.model, t, task)
            self.method.consolidate(self.model, t, examples, self.loop.probe(self.model, list(self.method.trainable_parameters(self.model))))
        stats = {**stats, **trained, "peak_memory_bytes": peak.bytes, "peak_memory_kind": peak.kind}
        self.replay.add_task(t, examples)
        return stats

    def run(self) -> dict:
        results_file = self.run_dir / "results.json"
        if self.state.tasks_completed == len(self.tasks) and results_file.exists():
            log.info("%s is complete: nothing to do (results: %s)", self.run_dir, results_file)
            return json.loads(results_file.read_text())
        total_started = time.perf_counter()
        self.state.record_invocation(invocation_record(str(self.device), self.state.tasks_completed))
        self._setup()
        self.logger.start(self.run_dir, self.run_dir.name, self.config)
        # Marks each invocation in train_log.jsonl: after a resume, the steps of a task that was
        # interrupted appear twice, and this line tells the attempts apart.
        self.events.write({"event": "start", "tasks_completed": self.state.tasks_completed})
        try:
            if not self.state.acc_matrix:
                row = self._evaluate_row(0)
                self.state.record_row(row)
                self.state.save()
                log.info("base model: %s general %s", _format_row(row.scores), _format_score(row.general))
            for t in range(self.state.tasks_completed, len(self.tasks)):
                stats = self._learn_task(t)
                row = self._evaluate_row(t + 1)

                def write_checkpoint(directory: Path, t=t) -> None:
                    self.method.save_checkpoint(self.model, directory, t)

                self.state.commit_task(t, write_checkpoint, row, stats)
                self.mid_task(t).clear()  # the task's own checkpoint holds it now
                log.info(
                    "task %d/%d %s: %d steps, %.1f s, %.0f tok/s, loss %.3f | R[%d] %s | general %s",
                    t + 1, len(self.tasks), self.task_names[t], stats["steps"], stats["seconds"], stats["tokens_per_s"],
                    stats["final_loss"] or float("nan"), t + 1, _format_row(row.scores), _format_score(row.general),
                )
            rolled_back = self._rollback() if self.cfg.get("rollback") else None
            results = self._finish(time.perf_counter() - total_started, rolled_back)
        except BaseException:
            self.logger.finish(exit_code=1)  # the W&B run is marked failed, and resumed by the next invocation
            raise
        self.logger.finish()
        return results

    def rescore(self) -> dict:
        """Score the eval suites again on every stored row, from the task checkpoints (no training).

        Each row's model is rebuilt as a resumed run would have it after that many tasks
        (the method set up afresh, then the checkpoints of the tasks before the row), so rows
        do not leak into each other. The suites' scores replace the stored ones; the matrix,
        task scores and probe stay. The run's eval settings become the new ones (resume it
        with them). A finished run's results.json is written again.
        """
        rows = len(self.state.acc_matrix)
        if not rows:
            raise UserError(f"{self.run_dir} has no evaluated row yet: nothing to re-score")
        missing = [str(p) for p in self.state.completed_checkpoints()[: rows - 1] if not p.is_dir()]
        if missing:
            raise UserError(f"{self.run_dir}: re-scoring rebuilds each row from the task checkpoints, and {missing[0]} is gone")
        started = time.perf_counter()
        self.state.record_invocation(invocation_record(str(self.device), self.state.tasks_completed))
        self.logger = NullLogger()
        self.events = EventLog(self.run_dir / "train_log.jsonl", self.logger, writer=self.world.is_main)
        abilities = []
        for row in tqdm(range(rows), desc="re-score rows", disable=not self.cfg.eval.progress_bar):
            self.method = build(self.cfg.method, "method")
            self._build_model()
            if row == 0:
                self._setup_suites()
            else:
                self.method.load_checkpoint(self.model, self.state.completed_checkpoints()[:row])
            members = self.method.eval_members(self.model, row, max(0, row - 1))
            suites = self._suites_at(row)
            with use_decoded(self._decode_together(members, generation_requests(suites.values()))):
                scores = {name: score_suite(suite, self.model, self.formatter, members, self.device, self.decode_batch) for name, suite in suites.items()}
            abilities.append(scores or None)
            log.info("re-scored row %d/%d: %s", row, rows - 1, {name: scores[name].get(suite.headline) for name, suite in suites.items() if suite.headline})
        self.state.abilities = abilities
        self.state.settings = result_settings(self.config)
        self.state.save()
        self.events.write({"event": "rescore", "rows": rows, "suites": sorted(self.suites)})
        results_file = self.run_dir / "results.json"
        if self.state.tasks_completed == len(self.tasks) and results_file.exists():
            rolled_back = json.loads(results_file.read_text()).get("rollback")  # kept: re-scoring does not redo it
            return self._finish(time.perf_counter() - started, rolled_back)
        return {"abilities": abilities}

    def _rollback(self) -> dict:
        """Undo the named tasks (in the order given) after the sequence and score every task again."""
        names = list(self.cfg.rollback)
        exact = {name: self.method.rollback(self.model, name) for name in names}
        members = lambda i: self.method.eval_members(self.model, len(self.tasks), i)  # noqa: E731
        task_scores = self._score_tasks(members, None, "eval after rollback")
        scores = [s[task.metric] for s, task in zip(task_scores, self.tasks)]
        self.events.write({"event": "rollback", "tasks": names, "bit_exact": exact, "scores": dict(zip(self.task_names, scores))})
        log.info("rolled back %s (bit for bit: %s): %s", names, exact, _format_row(scores))
        return {"tasks": names, "bit_exact": exact, "scores": scores, "task_scores": task_scores}

    def _finish(self, seconds: float, rolled_back: dict | None = None) -> dict:
        self.timing.update(self.state.timing)
        self.timing["this_invocation_s"] = seconds
        results = build_results(
            self.task_names, self.state.acc_matrix, self.state.general, self.timing, self.state.train_stats, self.config,
            self.state.task_scores, self.state.invocations, self.state.method_reports, self.state.fluency, self.state.abilities,
            lower_is_better=self.lower_is_better,
        )
        if rolled_back is not None:
            results["rollback"] = rolled_back
        if not self.world.is_main:
            return results
        write_json_atomic(self.run_dir / "results.json", results)
        heatmap = plot_heatmap(self.task_names, self.state.acc_matrix, self.run_dir / "acc_matrix.png", title=f"{self.cfg.method.name}: R[t][i]",
                               lower_is_better=self.lower_is_better)
        if results["abilities"]:
            plot_abilities(self.task_names, results["abilities"], {name: suite.headline for name, suite in self.suites.items()}, self.run_dir / "abilities.png")
        self.logger.log_results(results, heatmap, step=self.events.lines)
        metrics = results["metrics"]
        log.info(
            "done: acc %.3f avg_acc %.3f bwt %s fwt %s forgetting %s new_acc %.3f -> %s",
            metrics["acc"], metrics["avg_acc"], _format_score(metrics["bwt"], "+.3f"), _format_score(metrics["fwt"], "+.3f"), _format_score(metrics["forgetting"], ".3f"), metrics["new_acc"], self.run_dir / "results.json",
        )
        return results


def run(cfg: DictConfig, run_dir: str | Path, snapshot: Callable[[Path], None] | None = None) -> dict:
    """Run (or resume) the experiment described by ``cfg`` in ``run_dir``; return results.json's content.

    ``snapshot(run_dir)`` (the CLI's Hydra config snapshot) is called once the settings are
    accepted, so a refused invocation leaves the directory as it found it. A failure is
    written to ``error.txt`` while the lock is still held.

    Under ``torchrun`` every rank calls this with the same ``run_dir`` (run directories are
    named after the overrides, not the time); rank 0 holds the lock and writes, the others
    train and score their share alongside it (cl_runner.distributed).
    """
    run_dir = Path(run_dir)
    world = current_world(str(cfg.trainer.device), float(cfg.trainer.get("distributed_timeout_min") or 120))
    if not world.is_main:
        log.setLevel(logging.WARNING)  # one copy of each progress line, from rank 0
    with RunLock(run_dir) if world.is_main else nullcontext():  # a second process on the same directory is refused here
        if world.is_main:
            clear_error_file(run_dir)
        threads = torch.get_num_threads()  # restored: the next job of a sweep starts from the default
        try:
            if cfg.trainer.num_threads:
                torch.set_num_threads(cfg.trainer.num_threads)
            experiment = Experiment(cfg, run_dir, world)
            if snapshot is not None and world.is_main:
                snapshot(run_dir)
            return experiment.run()
        except Exception as exc:
            if world.is_main:
                write_error_file(run_dir, exc)
            raise
        finally:
            torch.set_num_threads(threads)
