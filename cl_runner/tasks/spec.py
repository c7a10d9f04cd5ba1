"""Task declarations: YAML in, validated examples out.

A task YAML names a data source, how to turn a record ("doc") into a prompt and a target,
optionally a closed set of choices, and a metric. ``include: other.yaml`` merges another
declaration first, so a family of tasks shares one base file. Every problem with a task
(unknown key, missing file, malformed line, empty split, target not among the choices)
raises :class:`UserError` naming the task, the file and the line.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import jinja2
import yaml

from cl_runner.errors import UserError
from cl_runner.tasks.sources import load_split

BUILTIN_TASK_DIR = Path(__file__).parent / "builtin"
BENCHMARK_TASK_DIR = Path(__file__).parent / "benchmarks"  # the field's sequences (hub data, or a local copy)
TASK_DIR_NAMES = {"builtin": BUILTIN_TASK_DIR, "benchmarks": BENCHMARK_TASK_DIR}
METRICS = ("acc", "acc_norm", "exact_match", "contains", "rouge_l", "edit_similarity", "sari")
# Knowledge-edit tasks (type: edit) put one of CounterFact's scores into the accuracy matrix.
EDIT_METRICS = ("efficacy", "paraphrase", "neighborhood", "edit_score")
# Language-modelling tasks (type: text) score held-out documents by perplexity (e^nats per
# token) or its log (nats per token): lower is better (cl_runner/evaluation/perplexity.py).
TEXT_METRICS = ("perplexity", "log_perplexity")
LOWER_IS_BETTER = frozenset(TEXT_METRICS)
TASK_TYPES = ("qa", "edit", "text")


@dataclass(frozen=True)
class Example:
    """One rendered record: the user prompt, the reference answer and, for closed sets, the choices."""

    prompt: str
    target: str
    choices: tuple[str, ...] | None = None


@dataclass
class Task:
    name: str
    dataset_path: str  # "json" | "csv" | "parquet" | a Hugging Face hub dataset id
    doc_to_text: str  # Jinja template (or a field name) giving the user prompt
    doc_to_target: str  # Jinja template (or a field name) giving the answer
    doc_to_choice: list[str] | str | None = None  # fixed list, or the name of a list-valued field
    metric: str = "acc"
    dataset_name: str | None = None
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    training_split: str | None = "train"
    test_split: str = "test"
    train_size: int | None = None  # first N training records (None: all)
    eval_size: int | None = None  # first N test records (None: all)
    # The first N records of each answer (class), in file order: the field's fixed samples per class.
    # With task_sequence.data_dir: the folder of this task's local copy (default: the task's name).
    # dataset_path "local" marks data that is not on the hub and comes only from there.
    local_folder: str | None = None
    # JSON files holding one object whose records_field lists the records (SuperNI: "Instances");
    # its other keys (SuperNI's "Definition") are fields of every record.
    records_field: str | None = None
    train_per_class: int | None = None
    eval_per_class: int | None = None
    generation_kwargs: dict[str, Any] = field(default_factory=lambda: {"max_new_tokens": 16})
    description: str = ""
    # One data file for both splits: hold out test_size records (a fraction in (0, 1) or a
    # count) drawn with split_seed, or say test_equals_train: true to score on the training data.
    test_size: float | int | None = None
    split_seed: int = 0
    test_equals_train: bool = False
    # type: edit reads knowledge-edit requests (edit_schema: counterfact | zsre) from the test
    # split; the first train_size of them form the task (or, with edit_batch_size, consecutive
    # tasks of that many requests each). An editor writes them into the weights; a trained
    # method learns rewrite prompt -> target_new (train = test = those pairs, raw text).
    # type: text is continual pre-training: each record is a document (doc_to_target renders it,
    # there is no prompt), trained on with the language-modelling loss on every token and scored
    # by perplexity (a metric of TEXT_METRICS) on the test split's documents.
    type: str = "qa"
    edit_schema: str = "counterfact"
    edit_batch_size: int | None = None
    edit_records: list[int] | None = None  # [start, end): these records of the file only (edit tasks)
    requests: list = field(default_factory=list, repr=False)
    train: list[Example] = field(default_factory=list, repr=False)
    test: list[Example] = field(default_factory=list, repr=False)
    # Set by the runner while the task is learnt: ``input_batches(prompts_only=False)`` gives a
    # fresh iterator of the training inputs (or only their prompts) as padded batches
    # ({"input_ids", "attention_mask"}), for methods that derive something from them before or
    # after training (InfLoRA's input covariance, CoLoR's prototypes).
    input_batches: Callable[[], Iterator[dict]] | None = field(default=None, repr=False, compare=False)
    # Set by the runner for edit tasks: the unedited model's argmax tokens over each neighbourhood
    # prompt's kept answer, which EasyEdit's locality compares against (editing/locality.py).
    locality_reference: list | None = field(default=None, repr=False, compare=False)

    @property
    def answer_reserve(self) -> int:
        """Tokens a prompt leaves free for a generated answer (0 when choices are scored instead)."""
        return 0 if self.metric in ("acc", "acc_norm") or self.type in ("edit", "text") else int(self.generation_kwargs.get("max_new_tokens", 16))

    def fingerprint(self) -> dict[str, str]:
        """A hash of each split's examples as the model sees them: a rerun on other data is caught by comparing these."""
        def digest(examples: list[Example]) -> str:
            text = json.dumps([[e.prompt, e.target, e.choices] for e in examples], ensure_ascii=False)
            return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

        prints = {"train": digest(self.train), "test": digest(self.test)}
        if self.requests:  # an edit's paraphrases and neighbours are scored too
            text = json.dumps([dataclasses.asdict(r) for r in self.requests], ensure_ascii=False)
            prints["requests"] = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return prints


_TASK_KEYS = {f.name for f in fields(Task)} - {"train", "test", "input_batches", "requests", "locality_reference"}


def _did_you_mean(key: str, options: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"task file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"task file {path} must hold a mapping of task keys")
    return data


def _resolve_includes(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a task YAML, merging the files it ``include``s (the including file wins)."""
    if path in seen:
        raise UserError(f"task file {path} includes itself through {[str(p) for p in seen]}")
    data = _read_yaml(path)
    base = data.pop("include", None)
    if base is None:
        merged = {}
    else:
        base_path = (path.parent / base).resolve()
        if not base_path.exists():
            raise UserError(f"task file {path}: include '{base}' not found at {base_path}")
        merged = _resolve_includes(base_path, seen + (path,))
    merged.update(_anchor_data_files(data, path.parent))
    return merged


def _anchor_data_files(data: dict, folder: Path) -> dict:
    """Make a task file's relative data_files relative to that file's folder, whoever includes it.

    (Inline tasks in a sequence config keep theirs relative to the working directory.)
    """
    kwargs = data.get("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        return data
    def anchor(path):
        return path if not isinstance(path, str) or Path(path).is_absolute() else str(folder / path)
    files = kwargs["data_files"]
    files = {k: anchor(v) for k, v in files.items()} if isinstance(files, dict) else anchor(files)
    return {**data, "dataset_kwargs": {**kwargs, "data_files": files}}


def find_task_file(name: str, task_dirs: list[str]) -> Path:
    """Locate ``name`` (a task name or a path to a YAML file) in the task search path."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        if candidate.exists():
            return candidate.resolve()
        raise UserError(f"task file '{name}' not found")
    dirs = [TASK_DIR_NAMES.get(d, Path(d)) for d in task_dirs]
    for directory in dirs:
        path = directory / f"{name}.yaml"
        if path.exists():
            return path.resolve()
    known = {p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml") if not p.stem.startswith("_")}
    raise UserError(
        f"unknown task '{name}'{_did_you_mean(name, known)}; searched {[str(d) for d in dirs]}. "
        f"Add {name}.yaml to one of them or set task_sequence.task_dirs"
    )


def _renderer(template: str, task_name: str, key: str):
    """Compile a Jinja template; a bare field name (no braces) selects that field."""
    if not template:  # a text task's documents have no prompt
        return lambda **_: ""
    source = template if "{{" in template or "{%" in template else "{{ " + template + " }}"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        compiled = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"task '{task_name}': {key} is not a valid template: {exc.message}") from exc
    return compiled.render


def _choices_of(task: Task, doc: dict) -> tuple[str, ...] | None:
    spec = task.doc_to_choice
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in doc:
            raise KeyError(spec)
        value = doc[spec]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"task '{task.name}': field '{spec}' named by doc_to_choice must hold a list")
        return tuple(str(v) for v in value)
    return tuple(str(v) for v in spec)


def _render_split(task: Task, split: str, records: list[tuple[str, int, dict]]) -> list[Example]:
    text_of = _renderer(task.doc_to_text, task.name, "doc_to_text")
    target_of = _renderer(task.doc_to_target, task.name, "doc_to_target")
    examples = []
    for source, line, doc in records:
        where = f"task '{task.name}', {source} line {line}"
        try:
            example = Example(text_of(**doc), target_of(**doc).strip(), _choices_of(task, doc))
        except (jinja2.UndefinedError, KeyError) as exc:
            raise UserError(f"{where}: the record has no field {exc} used by the task's templates") from exc
        except (jinja2.TemplateError, TypeError, ValueError) as exc:
            raise UserError(f"{where}: the task's templates fail on this record ({type(exc).__name__}: {exc})") from exc
        if not example.target:
            if task.type == "text":  # an empty document has no tokens to learn or score
                continue
            raise UserError(f"{where}: empty target")
        if example.choices is not None and example.target not in example.choices:
            raise UserError(
                f"{where}: target '{example.target}' is not among its choices {list(example.choices)}; "
                "fix the record or the task's doc_to_choice"
            )
        examples.append(example)
    return examples


def load_task(spec: str | dict, task_dirs: list[str] | None = None, size_overrides: dict | None = None, data_dir: str | None = None) -> Task:
    """Build a validated :class:`Task` from a task name, a YAML path, or an inline mapping (``data_dir``: ``use_local_copy``)."""
    task_dirs = list(task_dirs or ["builtin"])
    raw = _resolve_includes(find_task_file(spec, task_dirs)) if isinstance(spec, str) else dict(spec)
    if isinstance(spec, dict) and "include" in raw:
        base = raw.pop("include")
        raw = {**_resolve_includes(find_task_file(base, task_dirs)), **raw}
    name = raw.get("name", "<unnamed>")
    unknown = set(raw) - _TASK_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"task '{name}': unknown key '{key}'{_did_you_mean(key, _TASK_KEYS)}")
    required = {"name", "dataset_path"} | {"qa": {"doc_to_text", "doc_to_target"}, "text": {"doc_to_target"}}.get(raw.get("type", "qa"), set())
    missing = required - set(raw)
    if missing:
        raise UserError(f"task '{name}': missing required key(s) {sorted(missing)}")
    raw.update({k: v for k, v in (size_overrides or {}).items() if v is not None})
    if raw.get("dataset_path") == "local" and not data_dir:
        raise UserError(f"task '{name}': its data is not on the Hugging Face hub: set task_sequence.data_dir to a folder holding "
                        f"{raw.get('local_folder') or name}/train.json and test.json (see the task's description)")
    if data_dir and raw.get("dataset_path") not in ("json", "jsonl", "csv", "parquet"):
        raw = use_local_copy(raw, data_dir)
    if raw.get("type") in ("edit", "text"):
        raw.setdefault("doc_to_text", "")
        raw.setdefault("doc_to_target", "")
    if raw.get("type") == "text":
        raw.setdefault("metric", "perplexity")
    task = Task(**raw)
    if task.type not in TASK_TYPES:
        raise UserError(f"task '{task.name}': type must be one of {list(TASK_TYPES)}, got {task.type!r}")
    if task.type == "edit":
        return _load_edit_task(task)
    if task.type == "text" and task.metric not in TEXT_METRICS:
        raise UserError(f"task '{task.name}': a text task's metric is one of {list(TEXT_METRICS)}, got '{task.metric}'")
    if task.type == "qa" and task.metric not in METRICS:
        raise UserError(f"task '{task.name}': unknown metric '{task.metric}'{_did_you_mean(task.metric, set(METRICS))}; use one of {list(METRICS)}")
    if task.metric in ("acc", "acc_norm") and task.doc_to_choice is None:
        raise UserError(f"task '{task.name}': metric '{task.metric}' ranks choices, so the task needs doc_to_choice")
    if _one_file_for_both_splits(task) and not task.test_equals_train:
        train_records, test_records = _split_one_file(task)
        task.train = _examples(task, task.training_split, train_records, task.train_size)
        task.test = _examples(task, task.test_split, test_records, task.eval_size)
        return task
    if task.test_size is not None:
        raise UserError(f"task '{task.name}': test_size splits a single data file, but this task reads its splits from separate sources; remove test_size")
    splits = {"test": (task.test_split, task.eval_size)}
    if task.training_split:
        splits["train"] = (task.training_split, task.train_size)
    per_class = {"train": task.train_per_class, "test": task.eval_per_class}
    for attr, (split, limit) in splits.items():
        whole = per_class[attr] or task.type == "text"
        records = load_split(task, split, None if whole else limit)
        if per_class[attr]:
            records = _first_per_class(task, records, per_class[attr])[:limit]
        setattr(task, attr, _examples(task, split, records, limit))
    return task


def _examples(task: Task, split: str, records: list[tuple[str, int, dict]], limit: int | None) -> list[Example]:
    """The first ``limit`` examples of ``records``. A text task skips empty documents first, so
    that ``limit`` counts documents, and refuses a split left with none."""
    if task.type != "text":
        return _render_split(task, split, records[:limit])
    examples = _render_split(task, split, records)[:limit]
    if not examples:
        raise UserError(f"task '{task.name}': split '{split}' has no document with text ({len(records)} records, every one empty)")
    return examples


def _first_per_class(task: Task, records: list[tuple[str, int, dict]], count: int) -> list[tuple[str, int, dict]]:
    """The first ``count`` records of each target (rendered with doc_to_target), in file order."""
    target_of = _renderer(task.doc_to_target, task.name, "doc_to_target")
    taken: dict[str, int] = {}
    kept = []
    for record in records:
        try:
            target = target_of(**record[2]).strip()
        except (jinja2.UndefinedError, KeyError) as exc:
            raise UserError(f"task '{task.name}', {record[0]} line {record[1]}: the record has no field {exc} used by doc_to_target") from exc
        if taken.get(target, 0) < count:
            taken[target] = taken.get(target, 0) + 1
            kept.append(record)
    return kept


def use_local_copy(raw: dict, data_dir: str) -> dict:
    """A hub task read from ``<data_dir>/<task name>/{train,test}.jsonl`` (or ``.json``: JSON Lines or an
    array of records) instead: the same records, offline. ``local_folder`` renames the folder.
    A dataset with a single split (``training_split`` = ``test_split``) is copied as that one
    split, ``train.jsonl``, and held out from as on the hub (``test_size``, ``split_seed``)."""
    folder = Path(data_dir) / (raw.get("local_folder") or raw["name"])

    def split_file(split: str) -> str:
        array = folder / f"{split}.json"
        return str(array if array.exists() and not (folder / f"{split}.jsonl").exists() else folder / f"{split}.jsonl")

    one_split = bool(raw.get("training_split")) and raw.get("training_split") == raw.get("test_split", "test")
    splits = ("train",) if one_split else ("train", "test")
    files = {split: split_file(split) for split in splits}
    kwargs = {k: v for k, v in (raw.get("dataset_kwargs") or {}).items() if k != "data_files"}
    return {**raw, "dataset_path": "json", "dataset_name": None, "training_split": "train", "test_split": splits[-1],
            "dataset_kwargs": {**kwargs, "data_files": files}}


def _load_edit_task(task: Task) -> Task:
    from cl_runner.editing.requests import SCHEMAS

    if task.metric not in EDIT_METRICS:
        raise UserError(f"task '{task.name}': an edit task's metric is one of {list(EDIT_METRICS)}, got '{task.metric}'")
    if task.edit_schema not in SCHEMAS:
        raise UserError(f"task '{task.name}': edit_schema must be one of {sorted(SCHEMAS)}, got {task.edit_schema!r}")
    batch = task.edit_batch_size
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise UserError(f"task '{task.name}': edit_batch_size must be a positive integer or null, got {batch!r}")
    span = task.edit_records
    if span is not None and (not isinstance(span, (list, tuple)) or len(span) != 2 or not all(isinstance(v, int) and v >= 0 for v in span) or span[0] >= span[1]):
        raise UserError(f"task '{task.name}': edit_records must be [start, end) with 0 <= start < end, got {span!r}")
    records = load_split(task, task.test_split, None if span else task.train_size)
    if span:
        records = records[span[0] : span[1]][: task.train_size]
        if not records:
            raise UserError(f"task '{task.name}': edit_records {list(span)} selects no records")
    task.requests = [SCHEMAS[task.edit_schema](doc, f"task '{task.name}', {source} line {line}") for source, line, doc in records]
    task.train = task.test = _edit_examples(task.requests)
    return task


def _edit_examples(requests) -> list[Example]:
    """What a trained method learns from edit requests: rewrite prompt -> new target."""
    return [Example(r.rewrite_prompt, r.target_new) for r in requests]


def edit_batches(task: Task) -> list[Task]:
    """An edit task with ``edit_batch_size`` as consecutive tasks ``<name>_01``, ``<name>_02``, ...; others as they are."""
    if task.type != "edit" or not task.edit_batch_size:
        return [task]
    size = task.edit_batch_size
    chunks = [task.requests[i : i + size] for i in range(0, len(task.requests), size)]
    width = max(2, len(str(len(chunks))))
    batches = []
    for index, chunk in enumerate(chunks):
        examples = _edit_examples(chunk)
        batches.append(dataclasses.replace(task, name=f"{task.name}_{index + 1:0{width}d}", requests=chunk, train=examples, test=examples, edit_batch_size=None))
    return batches


def _one_file_for_both_splits(task: Task) -> bool:
    """True when training and test records would come from the same split or local file."""
    if task.training_split and task.training_split == task.test_split:  # a hub dataset with a single split (RealTimeData's monthly news)
        return True
    if not task.training_split or not isinstance(task.dataset_kwargs, dict):
        return False
    files = task.dataset_kwargs.get("data_files")
    if isinstance(files, str):
        return True
    if isinstance(files, dict) and task.training_split in files and task.test_split in files:
        train, test = files[task.training_split], files[task.test_split]
        return isinstance(train, str) and isinstance(test, str) and Path(train).resolve() == Path(test).resolve()
    return False


def _split_one_file(task: Task) -> tuple[list, list]:
    """Hold out ``test_size`` records of the task's one data file, drawn with ``split_seed``; both parts keep file order."""
    if task.test_size is None:
        raise UserError(
            f"task '{task.name}': one data file or split serves both the train and test splits, so the test set would equal "
            "the training set; set test_size (a fraction like 0.2, or a count) and split_seed to hold records out, "
            "or test_equals_train: true if that is what you want"
        )
    records = load_split(task, task.training_split, None)
    size = task.test_size
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0 or (isinstance(size, float) and size >= 1):
        raise UserError(f"task '{task.name}': test_size must be a fraction in (0, 1) or a positive count, got {size!r}")
    n_test = size if isinstance(size, int) else round(len(records) * size)
    if not 1 <= n_test < len(records):
        raise UserError(f"task '{task.name}': test_size {size!r} leaves no records for one split ({len(records)} records in all)")
    order = list(range(len(records)))
    random.Random(task.split_seed).shuffle(order)
    held_out = set(order[:n_test])
    train = [r for i, r in enumerate(records) if i not in held_out]
    test = [r for i, r in enumerate(records) if i in held_out]
    return train, test


def load_task_sequence(cfg: dict) -> tuple[list[Task], Task | None]:
    """The ordered tasks of ``cfg["tasks"]`` plus the optional general-ability probe task."""
    task_dirs = list(cfg.get("task_dirs") or ["builtin"])
    sizes = {key: cfg.get(key) for key in ("train_size", "eval_size", "train_per_class", "eval_per_class")}
    specs = list(cfg.get("tasks") or [])
    if not specs:
        raise UserError("task_sequence.tasks is empty: list at least one task")
    tasks = [batch for spec in specs for batch in edit_batches(load_task(spec, task_dirs, sizes, cfg.get("data_dir")))]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"task_sequence has duplicate task names {names}: give each task a distinct name")
    directions = {t.metric in LOWER_IS_BETTER for t in tasks}
    if len(directions) > 1:
        raise UserError(f"task_sequence mixes lower-is-better metrics ({sorted(LOWER_IS_BETTER)}) with higher-is-better ones "
                        f"({ {t.name: t.metric for t in tasks} }): the matrix's metrics (BWT, forgetting) need one direction; "
                        "run them as two sequences")
    probe = None
    if cfg.get("general_probe"):
        probe = load_task(cfg["general_probe"], task_dirs, {"eval_size": cfg.get("probe_size")})
    return tasks, probe
