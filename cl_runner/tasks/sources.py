"""Reading task records from local JSON Lines / CSV / Parquet files or the Hugging Face hub.

Local JSON and CSV files are read here rather than through ``datasets`` so that a malformed
record is reported with its file and line number. Each record comes back as
``(source, line_number, doc)``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

from cl_runner.errors import UserError

if TYPE_CHECKING:
    from cl_runner.tasks.spec import Task

LOCAL_FORMATS = ("json", "jsonl", "csv", "parquet")
Record = tuple[str, int, dict]


def _data_file(task: Task, split: str) -> Path:
    files = task.dataset_kwargs.get("data_files")
    if isinstance(files, dict):
        if split not in files:
            raise UserError(f"task '{task.name}': dataset_kwargs.data_files has no '{split}' entry (has {sorted(files)})")
        path = files[split]
    elif isinstance(files, str):
        path = files
    else:
        raise UserError(
            f"task '{task.name}': dataset_path '{task.dataset_path}' needs dataset_kwargs.data_files, "
            "e.g. {train: train.jsonl, test: test.jsonl}"
        )
    resolved = Path(path)  # task files anchor theirs to their folder; inline ones are relative to the cwd
    if not resolved.exists():
        raise UserError(f"task '{task.name}': data file '{path}' for split '{split}' not found (looked at {resolved.resolve()})")
    return resolved


def _read_jsonl(path: Path, task_name: str, limit: int | None) -> list[Record]:
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and len(records) >= limit:
                break
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"task '{task_name}': {path} line {line_number} is not valid JSON ({exc.msg})") from exc
            if not isinstance(doc, dict):
                raise UserError(f"task '{task_name}': {path} line {line_number} must be a JSON object")
            records.append((str(path), line_number, doc))
    return records


def _read_json(path: Path, task_name: str, limit: int | None, records_field: str | None = None) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if records_field is not None:
        return _read_json_object(path, text, task_name, limit, records_field)
    if text.lstrip().startswith("["):  # a JSON array of records rather than JSON Lines
        docs = _parse_json(path, text, task_name)
        if not isinstance(docs, list) or not all(isinstance(d, dict) for d in docs):
            raise UserError(f"task '{task_name}': {path} must hold JSON objects (one per line, or an array of them)")
        return [(str(path), i + 1, d) for i, d in enumerate(docs[:limit] if limit is not None else docs)]
    return _read_jsonl(path, task_name, limit)


def _parse_json(path: Path, text: str, task_name: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"task '{task_name}': {path} line {exc.lineno} is not valid JSON ({exc.msg})") from exc


def _read_json_object(path: Path, text: str, task_name: str, limit: int | None, records_field: str) -> list[Record]:
    """A file holding one JSON object whose ``records_field`` lists the records (SuperNI's task files:
    {"Definition": [...], "Instances": [...], ...}). Every other top-level key is given to each
    record too (a record's own keys win), so a template can read the task's ``Definition``."""
    document = _parse_json(path, text, task_name)
    if not isinstance(document, dict) or not isinstance(document.get(records_field), list):
        raise UserError(f"task '{task_name}': {path} must be a JSON object with a list of records under '{records_field}' (records_field)")
    shared = {k: v for k, v in document.items() if k != records_field}
    docs = document[records_field][:limit] if limit is not None else document[records_field]
    if not all(isinstance(d, dict) for d in docs):
        raise UserError(f"task '{task_name}': {path}: every entry of '{records_field}' must be a JSON object")
    return [(str(path), i + 1, {**shared, **d}) for i, d in enumerate(docs)]


def _read_csv(path: Path, limit: int | None) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = rows[:limit] if limit is not None else rows
    return [(str(path), i + 2, row) for i, row in enumerate(rows)]  # line 1 is the header


def _read_parquet(path: Path, limit: int | None) -> list[Record]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    rows = rows[:limit] if limit is not None else rows
    return [(str(path), i + 1, row) for i, row in enumerate(rows)]


def _read_hub(task: Task, split: str, limit: int | None) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(task.dataset_path, task.dataset_name, split=split, **task.dataset_kwargs)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one clear line
        raise UserError(
            f"task '{task.name}': could not load '{task.dataset_path}' split '{split}' from the Hugging Face hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); for local data use "
            "dataset_path: json|csv|parquet with dataset_kwargs.data_files"
        ) from exc
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return [(f"{task.dataset_path}[{split}]", i + 1, dict(row)) for i, row in enumerate(dataset)]


def _read_local(task: Task, path: Path, limit: int | None) -> list[Record]:
    try:
        if task.dataset_path in ("json", "jsonl"):
            return _read_json(path, task.name, limit, task.records_field)
        if task.dataset_path == "csv":
            return _read_csv(path, limit)
        return _read_parquet(path, limit)
    except UnicodeDecodeError as exc:
        raise UserError(f"task '{task.name}': {path} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from exc
    except (OSError, ValueError) as exc:  # unreadable file, or a Parquet file pyarrow cannot parse
        raise UserError(f"task '{task.name}': cannot read {path} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc


def load_split(task: Task, split: str, limit: int | None) -> list[Record]:
    """Records of one split, in file order, at most ``limit`` of them; never empty."""
    if not isinstance(task.dataset_kwargs, dict):
        raise UserError(f"task '{task.name}': dataset_kwargs must be a mapping, e.g. {{data_files: {{train: a.jsonl}}}}")
    if task.dataset_path in LOCAL_FORMATS:
        path = _data_file(task, split)
        records = _read_local(task, path, limit)
        where = str(path)
    else:
        records = _read_hub(task, split, limit)
        where = task.dataset_path
    if not records:
        raise UserError(f"task '{task.name}': split '{split}' has no examples in {where}; add records or fix the split")
    return records
