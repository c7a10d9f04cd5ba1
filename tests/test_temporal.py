"""Text tasks and the TiC-style temporal sequence: documents as windows, perplexity, the loaders, a run."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.errors import UserError
from cl_runner.evaluation import evaluate_task
from cl_runner.formatting import IGNORE_INDEX, PromptFormatter, document_windows
from cl_runner.tasks import Example, Task, load_task, load_task_sequence

from conftest import QUIET, REPO, compose_config, run_cli

FIXTURES = REPO / "tests" / "data" / "tic_news"
YEARS = [2017, 2018, 2019, 2020, 2021, 2022, 2023, 2024]
WINDOW = 24  # trainer.max_length of the temporal run: each fixture article (46 tokens) spans two windows


def test_a_document_is_cut_into_windows_after_the_start_token(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    text = "One two three four five six seven eight nine ten eleven."
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(tokens) > 8
    windows = document_windows(tokenizer, text, max_length=5)
    start = tokenizer.eos_token_id  # SmolLM2's tokenizer adds no BOS: documents follow an EOS, as when packed
    assert [w.input_ids for w in windows] == [[start, *tokens[i : i + 4]] for i in range(0, len(tokens), 4)]
    assert all(w.labels == [IGNORE_INDEX, *w.input_ids[1:]] for w in windows)
    assert sum(w.num_target_tokens for w in windows) == len(tokens)  # every token learnt and scored once


def test_perplexity_pools_the_token_losses_of_every_window(tiny_model_and_tokenizer):
    """exp of the mean token loss over all windows of all test documents, as Hugging Face's own loss computes it."""
    model, tokenizer = tiny_model_and_tokenizer
    documents = ["The council met on Monday to discuss the budget for the coming year.", "Rain is expected in the north."]
    task = Task(name="news", dataset_path="json", doc_to_text="", doc_to_target="t", type="text", metric="perplexity",
                test=[Example("", d) for d in documents])
    formatter = PromptFormatter(tokenizer, False, None, max_length=6)
    scores = evaluate_task(model, formatter, task, batch_size=3, device="cpu")
    nats = tokens = 0.0
    with torch.no_grad():
        for document in documents:
            for w in document_windows(tokenizer, document, 6):
                count = w.num_target_tokens
                loss = model(input_ids=torch.tensor([w.input_ids]), labels=torch.tensor([w.labels])).loss.item()
                nats, tokens = nats + loss * count, tokens + count
    assert scores["log_perplexity"] == pytest.approx(nats / tokens, rel=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)


def test_tic_news_reads_a_local_copy_of_each_month_in_the_hub_schema():
    """<data_dir>/<YYYY-MM>/train.jsonl is the month's one split: the same fifth is held out as on the hub,
    and articles without text (empty, or a null content) are skipped."""
    cfg = compose_config(["task_sequence=tic_news", f"task_sequence.data_dir={FIXTURES}"])
    tasks, probe = load_task_sequence(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    assert [t.name for t in tasks] == [f"news_{y}" for y in YEARS]
    assert {(t.type, t.metric) for t in tasks} == {("text", "log_perplexity")} and probe.name == "general_probe"
    first = tasks[0]
    documents = [e.target for e in first.train + first.test]
    assert len(documents) == 10 and all(d.startswith("Article ") and "January 2017" in d for d in documents)
    assert len(first.test) == 2 and {e.prompt for e in first.train} == {""}
    assert len(tasks[1].test) == 2 and len(tasks[1].train) == 8  # round(0.2 x 10) held out
    assert len(load_task("news_2017", ["benchmarks"], {"train_size": 8}, str(FIXTURES)).train) == 8  # 8 articles with text, not 8 records


def test_a_text_split_with_no_document_is_one_line(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(UserError, match=r"task 'docs': split '(train|test)' has no document with text \(2 records, every one empty\)"):
        load_task({"name": "docs", "type": "text", "dataset_path": "json", "dataset_kwargs": {"data_files": str(path)}, "doc_to_target": "text",
                   "test_equals_train": True})


def test_a_month_from_the_hub_holds_out_a_seeded_fifth_of_its_one_split(monkeypatch):
    """RealTimeData's months have one split ("train"): the task reads that month's config and holds
    test_size of it out with split_seed; a one-split task without test_size is refused."""
    import datasets

    calls = []

    def load_dataset(path, name, split, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"title": f"t{i}", "content": f"article {i} of {name}"} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = load_task("news_2019", ["benchmarks"])
    assert set(calls) == {("RealTimeData/bbc_news_alltime", "2019-01", "train")}
    held_out = {e.target for e in task.test}
    assert len(held_out) == 2 and len(task.train) == 8 and not held_out & {e.target for e in task.train}
    order = list(range(10))
    random.Random(0).shuffle(order)  # split_seed 0 draws the held-out records
    assert held_out == {f"article {i} of 2019-01" for i in order[:2]}
    with pytest.raises(UserError, match="one data file or split serves both the train and test splits"):
        load_task({"include": "news_2019", "test_size": None}, ["benchmarks"])


def test_a_sequence_mixing_perplexity_with_accuracy_is_refused(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a document"}) + "\n")
    text_task = {"name": "docs", "type": "text", "dataset_path": "json", "dataset_kwargs": {"data_files": str(path)}, "doc_to_target": "text",
                 "test_equals_train": True}
    with pytest.raises(UserError, match="mixes lower-is-better metrics"):
        load_task_sequence({"tasks": [text_task, "second_word"], "task_dirs": ["builtin"], "train_size": 2, "eval_size": 2})
    with pytest.raises(UserError, match=r"a text task's metric is one of \['perplexity', 'log_perplexity'\], got 'acc'"):
        load_task({**text_task, "metric": "acc"})


def test_a_temporal_run_learns_each_period_and_reports_the_split(tmp_path, tiny_model_and_tokenizer):
    """Two periods on the tiny model: the training loss is the language-modelling loss on every token of
    the documents, training on a month lowers its perplexity, and results.json carries the matrix in
    perplexities, the direction, TiC-LM's split and each task's log perplexity."""
    run_dir = tmp_path / "run"
    result = run_cli(["experiment=smoke", *QUIET, "task_sequence=tic_news", f"task_sequence.data_dir={FIXTURES}", "task_sequence.tasks=[news_2017,news_2018]", "task_sequence.train_size=3",
                      "~eval.suites", "trainer.max_steps=3", "trainer.lr=0.01", f"trainer.max_length={WINDOW}", "trainer.batch_size=16", "task_sequence.general_probe=null",
                      f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    R = results["acc_matrix"]
    assert results["higher_is_better"] is False and min(min(row) for row in R) > 1.0
    assert R[1][0] < R[0][0] and R[2][1] < R[1][1]  # each month's perplexity falls while it is learnt
    # two periods, by hand: the diagonal, the one task learnt before (R[2][0]), the one still to come (R[1][1])
    assert results["metrics"]["temporal"] == pytest.approx({"in_distribution": (R[1][0] + R[2][1]) / 2, "backward": R[2][0], "forward": R[1][1]})
    assert results["metrics"]["bwt"] == pytest.approx(R[1][0] - R[2][0])  # on -R: negative when the first month's perplexity rose
    # One step (batch 16) holds the six windows of the month's three training articles: before it,
    # the loss is their log perplexity under the base model with the same windows (the new adapter
    # starts at zero).
    events = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    first_loss = next(e["loss"] for e in events if e["event"] == "train_step")
    model, tokenizer = tiny_model_and_tokenizer
    month = load_task("news_2017", ["benchmarks"], {"train_size": 3}, data_dir=str(FIXTURES))
    as_test = Task(name="train", dataset_path="json", doc_to_text="", doc_to_target="t", type="text", test=month.train)
    assert first_loss == pytest.approx(evaluate_task(model, PromptFormatter(tokenizer, False, None, WINDOW), as_test, 4, "cpu")["log_perplexity"], rel=1e-4)
    scores = results["task_scores"][2][0]
    assert scores["log_perplexity"] == pytest.approx(math.log(scores["perplexity"]))
    assert (run_dir / "acc_matrix.png").exists()
    # cl-runner-report says which rows are lower-is-better, and plots them on their own scale
    from cl_runner.report import find_runs, markdown_table
    from cl_runner.report_plots import write_plots

    assert "Lower is better for the task scores (perplexity) of" in markdown_table(find_runs([run_dir]))
    written = write_plots(find_runs([run_dir]), tmp_path / "plots")
    assert {p.name for p in written} >= {"forgetting.png"} and all(p.stat().st_size > 0 for p in written)
