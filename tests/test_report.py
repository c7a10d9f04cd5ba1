"""cl-runner-report: mean ± std over seeds from a sweep folder, and the runs without results listed."""

import json
import subprocess
import sys

import pytest
import yaml

from cl_runner.report import find_runs, markdown_table, mean_std, report


def fake_run(root, overrides, acc=None, error=None, seconds=10.0):
    directory = root / ",".join(overrides)
    (directory / ".hydra").mkdir(parents=True)
    (directory / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, "logger=none", "trainer.num_threads=1"]))
    (directory / "state.json").write_text("{}")
    if acc is not None:
        metrics = {"acc": acc, "bwt": -acc / 2, "fwt": 0.0, "forgetting": acc / 2, "new_acc": 1.0, "general_delta": -0.1}
        resources = {"trainable_parameters": 2_000_000, "bytes_per_task": 8e6, "peak_memory_bytes": 2e9, "seconds_per_task": seconds}
        (directory / "results.json").write_text(json.dumps({"metrics": metrics, "resources": resources}))
    if error is not None:
        (directory / "error.txt").write_text(f"Traceback ...\n{error}\n")
    return directory


def table_rows(table: str) -> dict[str, list[str]]:
    """A markdown table's rows by name: the cells after the name (seeds first)."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines() if line.startswith("| `")}


def test_seeds_form_one_row_with_sample_mean_and_std(tmp_path):
    fake_run(tmp_path, ["recipe=a", "seed=0"], acc=0.5, seconds=10)
    fake_run(tmp_path, ["recipe=a", "seed=1"], acc=0.7, seconds=14)
    fake_run(tmp_path, ["recipe=b", "seed=0"], acc=0.25)
    table = markdown_table(find_runs([tmp_path]))
    rows = table_rows(table)
    assert set(rows) == {"`recipe=a`", "`recipe=b`"}  # logger / num_threads cannot change results: not in the name
    seeds, acc, bwt = rows["`recipe=a`"][:3]
    assert seeds == "0,1"
    assert acc == "0.600 ± 0.141"  # mean 0.6, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert bwt == "-0.300 ± 0.071"
    assert rows["`recipe=a`"][-1] == "12 ± 3"  # seconds per task: 10 and 14
    assert rows["`recipe=a`"][-4:-2] == ["2", "8"]  # sizes (M parameters, MB per task) do not vary with the seed: no ±
    assert rows["`recipe=b`"][1] == "0.250"  # one seed: no ±


def test_runs_without_results_are_listed_with_their_reason(tmp_path):
    fake_run(tmp_path, ["recipe=a", "seed=0"], acc=0.5)
    failed = fake_run(tmp_path, ["recipe=a", "seed=1"], error="trainer.lr must be a positive number, got -1")
    unfinished = fake_run(tmp_path, ["recipe=a", "seed=2"])
    text = report(find_runs([tmp_path]))
    assert "2 run(s) without results.json" in text
    assert f"- {failed}: failed: trainer.lr must be a positive number, got -1" in text
    assert f"- {unfinished}: unfinished" in text


def test_split_gives_one_table_per_value(tmp_path):
    fake_run(tmp_path, ["recipe=a", "seed=0", "task_sequence=x"], acc=0.5)
    fake_run(tmp_path, ["recipe=a", "seed=0", "task_sequence=y"], acc=0.9)
    text = report(find_runs([tmp_path]), split="task_sequence")
    x, y = text.split("### task_sequence=y")
    assert "### task_sequence=x" in x and "0.500" in x and "0.900" not in x
    assert "0.900" in y and "0.500" not in y


def test_mean_std_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)


def test_cli_refuses_a_missing_folder_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cl_runner.report", str(tmp_path / "nope")], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip() == f"cl-runner-report: error: not a folder: {tmp_path / 'nope'}"


def test_a_single_row_keeps_its_name(tmp_path):
    fake_run(tmp_path, ["recipe=a", "seed=0"], acc=0.5)
    fake_run(tmp_path, ["recipe=a", "seed=1"], acc=0.5)
    assert "| `recipe=a` | 0,1 |" in markdown_table(find_runs([tmp_path]))


def test_edit_table_reads_immediate_scores_from_the_diagonal_and_retention_from_the_last_row(tmp_path):
    from cl_runner.report import EDIT_COLUMNS

    directory = fake_run(tmp_path, ["method=memit", "seed=0"], acc=0.5)
    edit = lambda es, loc: {"efficacy": es, "paraphrase": es / 2, "neighborhood": 0.8, "edit_score": es, "locality": loc, "rewrite_acc": es}  # noqa: E731
    skill = {"acc": 0.3}
    results = json.loads((directory / "results.json").read_text())
    results["task_scores"] = [  # rows: base, after e1, after skill, after e2
        [edit(0.1, 1.0), skill, edit(0.2, 1.0)],
        [edit(1.0, 0.9), skill, edit(0.2, 0.9)],
        [edit(0.9, 0.8), skill, edit(0.3, 0.8)],
        [edit(0.6, 0.7), skill, edit(0.8, 0.6)],
    ]
    results["fluency"] = [5.0, 4.9, 4.5, 4.0]
    (directory / "results.json").write_text(json.dumps(results))
    table = markdown_table(find_runs([tmp_path]), EDIT_COLUMNS)
    cells = [c.strip() for c in table.splitlines()[-1].split("|")[2:-1]]
    titles = [c.title for c in EDIT_COLUMNS]
    assert cells[1 + titles.index("efficacy (imm.)")] == "0.900"  # e1 after e1 (1.0) and e2 after e2 (0.8)
    assert cells[1 + titles.index("efficacy (ret.)")] == "0.700"  # last row: 0.6 and 0.8
    assert cells[1 + titles.index("paraphrase (ret.)")] == "0.350"
    assert cells[1 + titles.index("locality (ret.)")] == "0.650"
    assert cells[1 + titles.index("fluency Δ")] == "-1.00"


def test_learners_table_averages_the_last_rows_task_identification(tmp_path):
    from cl_runner.report import LEARNER_COLUMNS

    for seed, last in ((0, {"0": 1.0, "1": 0.5, "2": 0.9}), (1, {"0": 0.8, "1": 0.7, "2": 0.6})):
        directory = fake_run(tmp_path, ["recipe=color", f"seed={seed}"], acc=0.5)
        results = json.loads((directory / "results.json").read_text())
        results["method_reports"] = [None, {"task_identification": {"0": 0.1}}, {"task_identification": {"0": 0.2, "1": 0.3}}, {"task_identification": last}]
        (directory / "results.json").write_text(json.dumps(results))
    fake_run(tmp_path, ["recipe=seq_lora", "seed=0"], acc=0.5)  # reports nothing: no figure, not a zero
    rows = table_rows(markdown_table(find_runs([tmp_path]), LEARNER_COLUMNS))
    assert rows["`recipe=color`"][-1] == "0.750 ± 0.071"  # seed 0: 2.4 / 3 = 0.8, seed 1: 2.1 / 3 = 0.7 (earlier rows ignored)
    assert rows["`recipe=seq_lora`"][-1] == "-"


def test_latex_and_csv_tables_hold_the_same_numbers(tmp_path):
    import csv
    import io

    from cl_runner.report import csv_table, latex_table

    fake_run(tmp_path, ["recipe=my_a", "seed=0", "task_sequence=x"], acc=0.5, seconds=10)
    fake_run(tmp_path, ["recipe=my_a", "seed=1", "task_sequence=x"], acc=0.7, seconds=14)
    records = find_runs([tmp_path])
    latex = latex_table(records)
    assert r"recipe=my\_a task\_sequence=x & $0.600 \pm 0.141$ & $-0.300 \pm 0.071$" in latex  # underscores escaped, mean ± sample std
    assert latex.splitlines()[1].startswith(r"\begin{tabular}{l") and latex.endswith(r"\end{tabular}")
    from cl_runner.report import _latex_escape

    assert _latex_escape(r"a\b_{c}~Δ") == r"a\textbackslash{}b\_\{c\}\textasciitilde{}$\Delta$"  # one pass: no escaping of escapes
    [row] = list(csv.DictReader(io.StringIO(csv_table(records))))
    assert row["run"] == "recipe=my_a task_sequence=x" and row["seeds"] == "0,1" and row["acc n"] == "2"
    assert float(row["acc mean"]) == pytest.approx(0.6) and float(row["acc std"]) == pytest.approx(0.1414213562)
    split = list(csv.DictReader(io.StringIO(report(records, split="task_sequence", table_format="csv"))))
    assert split[0]["task_sequence"] == "x" and float(split[0]["acc mean"]) == pytest.approx(0.6)
    fake_run(tmp_path, ["recipe=b", "seed=0", "task_sequence=x"], acc=0.25)
    rows = {r["run"]: r for r in csv.DictReader(io.StringIO(csv_table(find_runs([tmp_path]))))}
    assert rows["recipe=b"]["acc mean"] == "0.25" and rows["recipe=b"]["acc std"] == "" and rows["recipe=b"]["acc n"] == "1"


def test_plots_average_the_seeds_matrices(tmp_path):
    from cl_runner.report_plots import mean_matrix, write_plots

    matrices = {0: [[0.0, 0.2], [1.0, 0.2], [0.4, 1.0]], 1: [[0.0, 0.4], [0.8, 0.4], [0.6, 0.8]]}
    for seed, matrix in matrices.items():
        directory = fake_run(tmp_path / "runs", ["method=m", f"seed={seed}"], acc=0.5)
        results = json.loads((directory / "results.json").read_text())
        results.update({"tasks": ["t1", "t2"], "acc_matrix": matrix})
        (directory / "results.json").write_text(json.dumps(results))
    records = find_runs([tmp_path / "runs"])
    from cl_runner.report import group_runs

    [group] = group_runs(records)[1]
    assert [v for row in mean_matrix(group) for v in row] == pytest.approx([0.0, 0.3, 0.9, 0.3, 0.5, 0.9])
    written = write_plots(records, tmp_path / "plots")
    assert sorted(p.name for p in written) == ["forgetting.png", "general_delta.png", "method=m_curves.png", "method=m_matrix.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
