"""Task YAML loading, the built-in data, and each kind of bad task input."""

import json
import subprocess
import sys

import pytest

from cl_runner.errors import UserError
from cl_runner.tasks import load_task, load_task_sequence
from omegaconf import OmegaConf

from conftest import REPO

FIXTURES = REPO / "tests" / "data"

BUILTIN_DATA = REPO / "cl_runner" / "tasks" / "builtin" / "data"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def inline_task(tmp_path, **overrides):
    write_jsonl(tmp_path / "train.jsonl", [{"q": "2+2", "a": "4"}, {"q": "3+3", "a": "6"}])
    write_jsonl(tmp_path / "test.jsonl", [{"q": "1+1", "a": "2"}])
    spec = {
        "name": "sums",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}},
        "doc_to_text": "What is {{ q }}?",
        "doc_to_target": "a",
        "metric": "exact_match",
    }
    spec.update(overrides)
    return spec


def test_builtin_sequence_loads_with_include_and_templates():
    tasks, probe = load_task_sequence({"tasks": ["second_word", "last_word"], "task_dirs": ["builtin"], "general_probe": "general_probe", "train_size": 5, "eval_size": 3})
    second = tasks[0]
    assert second.metric == "acc" and len(second.train) == 5 and len(second.test) == 3
    first_record = json.loads((BUILTIN_DATA / "second_word.test.jsonl").read_text().splitlines()[0])
    example = second.test[0]
    assert example.prompt == "Reply with the second word of the list.\nWords:\n" + "\n".join(first_record["words"])
    assert example.target == first_record["words"][1] and example.choices == tuple(first_record["words"])
    assert tasks[1].test[0].target == json.loads((BUILTIN_DATA / "last_word.test.jsonl").read_text().splitlines()[0])["words"][4]
    assert probe.name == "general_probe" and probe.metric == "contains" and not probe.train


def test_builtin_data_is_what_the_generator_writes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_builtin_data.py"), "--out", str(tmp_path)], check=True, capture_output=True)
    # counterfacts.jsonl comes from scripts/make_edit_data.py (checked in tests/test_edit_data.py)
    shipped = sorted(p.name for p in BUILTIN_DATA.glob("*.jsonl") if p.name != "counterfacts.jsonl")
    assert shipped == sorted(p.name for p in tmp_path.glob("*.jsonl"))
    for name in shipped:
        assert (tmp_path / name).read_text() == (BUILTIN_DATA / name).read_text(), name


def test_probe_and_replay_data_do_not_overlap():
    probe = {json.loads(l)["instruction"] for l in (BUILTIN_DATA / "general_probe.test.jsonl").read_text().splitlines()}
    replay = {json.loads(l)["instruction"] for l in (BUILTIN_DATA / "general_instructions.train.jsonl").read_text().splitlines()}
    assert probe and replay and not probe & replay


def test_inline_task_from_user_files(tmp_path):
    task = load_task(inline_task(tmp_path))
    assert [e.prompt for e in task.train] == ["What is 2+2?", "What is 3+3?"]
    assert task.test[0].target == "2" and task.test[0].choices is None


def test_csv_source(tmp_path):
    (tmp_path / "d.csv").write_text("q,a\n2+2,4\n")
    task = load_task(inline_task(tmp_path, dataset_path="csv", dataset_kwargs={"data_files": str(tmp_path / "d.csv")}, test_equals_train=True))
    assert task.train[0].target == "4"


def test_missing_data_file_names_the_path(tmp_path):
    spec = inline_task(tmp_path, dataset_kwargs={"data_files": {"train": "nope.jsonl", "test": "nope.test.jsonl"}})
    with pytest.raises(UserError, match=r"task 'sums': data file 'nope.test.jsonl' for split 'test' not found"):
        load_task(spec)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    spec = inline_task(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"q": "1", "a": "1"}\n{"q": "2", "a": \n')
    with pytest.raises(UserError, match=r"train.jsonl line 2 is not valid JSON"):
        load_task(spec)


def test_task_with_no_examples(tmp_path):
    spec = inline_task(tmp_path)
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"split 'test' has no examples"):
        load_task(spec)


def test_target_not_among_choices_names_the_line(tmp_path):
    spec = inline_task(tmp_path, doc_to_choice=["4", "6"], metric="acc")
    with pytest.raises(UserError, match=r"test.jsonl line 1: target '2' is not among its choices \['4', '6'\]"):
        load_task(spec)


def test_misspelled_task_key_suggests_the_right_one(tmp_path):
    spec = inline_task(tmp_path)
    spec["doc_to_txt"] = spec.pop("doc_to_text")
    with pytest.raises(UserError, match=r"unknown key 'doc_to_txt' \(did you mean 'doc_to_text'\?\)"):
        load_task(spec)


def test_template_field_missing_from_record(tmp_path):
    with pytest.raises(UserError, match=r"has no field 'question'"):
        load_task(inline_task(tmp_path, doc_to_text="{{ question }}"))


def test_unknown_task_name_suggests_builtin():
    with pytest.raises(UserError, match=r"unknown task 'last_wrd' \(did you mean 'last_word'\?\)"):
        load_task("last_wrd")


def test_acc_metric_requires_choices(tmp_path):
    with pytest.raises(UserError, match="needs doc_to_choice"):
        load_task(inline_task(tmp_path, metric="acc"))


def test_relative_data_files_follow_the_file_that_names_them(tmp_path, monkeypatch):
    """A task YAML's paths are relative to its folder; an inline task's to the working directory."""
    tasks_dir = tmp_path / "tasks"
    (tasks_dir / "data").mkdir(parents=True)
    write_jsonl(tasks_dir / "data" / "d.jsonl", [{"q": "in base folder", "a": "x"}])
    (tasks_dir / "base.yaml").write_text(
        "dataset_path: json\ndataset_kwargs: {data_files: {train: data/d.jsonl, test: data/d.jsonl}}\ntest_equals_train: true\n"
        "doc_to_text: q\ndoc_to_target: a\nmetric: exact_match\n"
    )
    monkeypatch.chdir(tmp_path)
    from_base = load_task({"include": "base", "name": "uses_base"}, [str(tasks_dir)])
    assert from_base.test[0].prompt == "in base folder"
    write_jsonl(tmp_path / "mine.jsonl", [{"q": "in working directory", "a": "y"}])
    own_files = load_task({"include": "base", "name": "own", "dataset_kwargs": {"data_files": "mine.jsonl"}}, [str(tasks_dir)])
    assert own_files.test[0].prompt == "in working directory"


SUMS = [{"q": f"{i}+{i}", "a": str(2 * i)} for i in range(10)]


def one_file_task(tmp_path, **overrides):
    write_jsonl(tmp_path / "all.jsonl", SUMS)
    return inline_task(tmp_path, dataset_kwargs={"data_files": str(tmp_path / "all.jsonl")}, **overrides)


def test_one_file_for_both_splits_is_refused_without_a_split_rule(tmp_path):
    with pytest.raises(UserError, match="one data file or split serves both the train and test splits, so the test set would equal the training set; set test_size"):
        load_task(one_file_task(tmp_path))
    same = str(tmp_path / "all.jsonl")  # the same file named twice is the same case
    with pytest.raises(UserError, match="one data file or split serves both"):
        load_task(inline_task(tmp_path, dataset_kwargs={"data_files": {"train": same, "test": same}}))


@pytest.mark.parametrize("test_size,held_out", [(0.3, 3), (4, 4)])
def test_test_size_holds_out_seeded_records(tmp_path, test_size, held_out):
    task = load_task(one_file_task(tmp_path, test_size=test_size, split_seed=7))
    train, test = [e.prompt for e in task.train], [e.prompt for e in task.test]
    assert len(test) == held_out and len(train) == 10 - held_out
    assert set(train).isdisjoint(test) and set(train) | set(test) == {f"What is {r['q']}?" for r in SUMS}
    assert train == sorted(train, key=lambda p: int(p.split()[2].split("+")[0]))  # file order kept
    again = load_task(one_file_task(tmp_path, test_size=test_size, split_seed=7))
    assert [e.prompt for e in again.test] == test  # the seed fixes the split
    other = load_task(one_file_task(tmp_path, test_size=test_size, split_seed=8))
    assert [e.prompt for e in other.test] != test


def test_test_equals_train_is_an_explicit_opt_in(tmp_path):
    task = load_task(one_file_task(tmp_path, test_equals_train=True))
    assert task.test == task.train and len(task.train) == 10


@pytest.mark.parametrize("test_size,pattern", [(1.5, "must be a fraction in \\(0, 1\\) or a positive count"), (0, "must be a fraction"), (10, "leaves no records"), (0.01, "leaves no records")])
def test_bad_test_size(tmp_path, test_size, pattern):
    with pytest.raises(UserError, match=pattern):
        load_task(one_file_task(tmp_path, test_size=test_size))


def test_test_size_with_separate_files_is_refused(tmp_path):
    with pytest.raises(UserError, match="test_size splits a single data file"):
        load_task(inline_task(tmp_path, test_size=0.2))


def test_fingerprint_follows_the_examples(tmp_path):
    spec = inline_task(tmp_path)
    first = load_task(spec).fingerprint()
    assert first == load_task(spec).fingerprint()
    write_jsonl(tmp_path / "test.jsonl", [{"q": "1+1", "a": "3"}])
    edited = load_task(spec).fingerprint()
    assert edited["train"] == first["train"] and edited["test"] != first["test"]


@pytest.mark.parametrize("order", [1, 2, 3])
def test_standard_cl_orders_load_from_a_local_copy_of_the_hub_records(order):
    """task_sequence=standard_cl_order<n>: the O-LoRA task orders, label words from the hub schema, samples per class."""
    from cl_runner.config import compose_config
    from cl_runner.tasks.spec import load_task_sequence

    expected = {1: ["dbpedia", "amazon", "yahoo", "ag_news"], 2: ["dbpedia", "amazon", "ag_news", "yahoo"], 3: ["yahoo", "amazon", "ag_news", "dbpedia"]}
    cfg = compose_config([f"task_sequence=standard_cl_order{order}", f"task_sequence.data_dir={FIXTURES / 'standard_cl'}",
                          "task_sequence.train_per_class=2", "task_sequence.eval_per_class=1"])
    tasks, probe = load_task_sequence(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    assert [t.name for t in tasks] == expected[order] and probe.name == "general_probe"
    by_name = {t.name: t for t in tasks}
    classes = {"ag_news": 4, "dbpedia": 14, "yahoo": 10, "amazon": 5}
    for name, task in by_name.items():
        assert len(task.train) == 2 * classes[name] and len(task.test) == classes[name]  # 2 / 1 per class, every class
        assert task.metric == "exact_match" and task.answer_reserve == 8
        assert sorted({e.target for e in task.train}) == sorted({e.target for e in task.test})
    news = by_name["ag_news"].train[:4]  # the fixture interleaves the classes 0, 1, 2, 3
    assert [e.target for e in news] == ["World", "Sports", "Business", "Science"]
    assert news[1].prompt.startswith("What is the topic of the following paragraph?") and "train news story 0 of kind 1." in news[1].prompt
    assert by_name["amazon"].test[4].target == "very positive" and "Option: very negative, negative" in by_name["amazon"].test[4].prompt
    assert by_name["yahoo"].train[1].target == "Science & Mathematics"


def test_a_benchmark_sequence_without_its_local_copy_says_where_it_looked(tmp_path):
    from cl_runner.config import compose_config
    from cl_runner.tasks.spec import load_task_sequence

    cfg = compose_config(["task_sequence=standard_cl_order1", f"task_sequence.data_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"task 'dbpedia': data file .*dbpedia/test.jsonl' for split 'test' not found"):
        load_task_sequence(OmegaConf.to_container(cfg.task_sequence, resolve=True))


@pytest.mark.parametrize("order", [4, 5, 6])
def test_long_sequence_orders_load_all_fifteen_tasks(order):
    from cl_runner.config import compose_config
    from cl_runner.tasks.spec import load_task_sequence

    cfg = compose_config([f"task_sequence=long_order{order}", f"task_sequence.data_dir={FIXTURES / 'standard_cl'}", "task_sequence.train_per_class=1"])
    tasks, _ = load_task_sequence(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    first = {4: "mnli", 5: "multirc", 6: "yelp"}[order]
    assert len(tasks) == 15 and len({t.name for t in tasks}) == 15 and tasks[0].name == first
    by_name = {t.name: t for t in tasks}
    assert [e.target for e in by_name["mnli"].train] == ["entailment", "neutral", "contradiction"]
    assert [e.target for e in by_name["copa"].test[:2]] == ["It broke.", "It floated."]  # the chosen alternative's text
    assert by_name["rte"].test[1].target == "not_entailment" and by_name["boolq"].train[1].target == "True"


def test_trace_loads_its_eight_tasks_from_the_released_folders_with_their_metrics():
    """task_sequence=trace: TRACE's folders of JSON arrays ({"prompt", "answer"}), each task with the paper's metric."""
    from cl_runner.config import compose_config
    from cl_runner.tasks.spec import load_task_sequence

    cfg = compose_config(["task_sequence=trace", f"task_sequence.data_dir={FIXTURES / 'trace'}"])
    tasks, _ = load_task_sequence(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    metrics = {t.name: t.metric for t in tasks}
    assert metrics == {"trace_c_stance": "exact_match", "trace_fomc": "exact_match", "trace_meetingbank": "rouge_l", "trace_py150": "edit_similarity",
                       "trace_scienceqa": "exact_match", "trace_numglue_cm": "exact_match", "trace_numglue_ds": "exact_match", "trace_20minuten": "sari"}
    by_name = {t.name: t for t in tasks}
    assert all(len(t.train) == 2 and len(t.test) == 2 for t in tasks)
    assert by_name["trace_numglue_ds"].test[1].target == "42" and by_name["trace_numglue_ds"].test[1].prompt == "What is 6 times 7? Answer:"
    assert by_name["trace_c_stance"].train[0].prompt.startswith("判断以下文本") and by_name["trace_py150"].train[0].target == "return a + b"
    with pytest.raises(UserError, match=r"task 'trace_c_stance': its data is not on the Hugging Face hub: set task_sequence.data_dir to a folder holding C-STANCE/train.json"):
        load_task_sequence(OmegaConf.to_container(compose_config(["task_sequence=trace"]).task_sequence, resolve=True))


SAPT_ORDER_1 = ["task1572_samsum_summary", "task363_sst2_polarity_classification", "task1290_xsum_summarization", "task181_outcome_extraction",
                "task002_quoref_answer_generation", "task1510_evalution_relation_extraction", "task639_multi_woz_user_utterance_generation",
                "task1729_personachat_generate_next", "task073_commonsenseqa_answer_generation", "task1590_diplomacy_text_generation",
                "task748_glucose_reverse_cause_event_detection", "task511_reddit_tifu_long_text_summarization", "task591_sciq_answer_generation",
                "task1687_sentiment140_classification", "task875_emotion_classification"]


@pytest.mark.parametrize("order", [1, 2])
def test_superni_orders_read_sapt_task_files_with_its_prompt(order):
    """task_sequence=superni_order1|2: SAPT's 15 SuperNI task files (one JSON object: Definition, Instances),
    in SAPT's orders, prompted zero-shot as SAPT's code does, scored by ROUGE-L."""
    from cl_runner.config import compose_config

    cfg = compose_config([f"task_sequence=superni_order{order}", f"task_sequence.data_dir={FIXTURES / 'superni'}"])
    tasks, _ = load_task_sequence(OmegaConf.to_container(cfg.task_sequence, resolve=True))
    names = [t.name for t in tasks]
    assert sorted(names) == sorted(SAPT_ORDER_1) and len(set(names)) == 15
    if order == 1:
        assert names == SAPT_ORDER_1
    else:
        assert names == [SAPT_ORDER_1[i] for i in (10, 8, 9, 6, 0, 13, 12, 1, 5, 7, 3, 11, 4, 2, 14)]  # SAPT's order 2
    assert {t.metric for t in tasks} == {"rouge_l"} and all(len(t.train) == 2 and len(t.test) == 2 for t in tasks)
    by_name = {t.name: t for t in tasks}
    samsum = by_name["task1572_samsum_summary"].test[1]
    assert samsum.prompt == ("Definition: Do what task1572_samsum_summary asks.\n\nNow complete the following example -\n"
                             "Input: Input 1 of the test split.\nOutput: ")
    assert samsum.target == "reference 1 a"  # the first of the references
    sst2 = by_name["task363_sst2_polarity_classification"].train[1]
    assert sst2.target == "NEG" and sst2.prompt.startswith("Definition: Classify the sentence (task363_sst2_polarity_classification).\n\n")


def test_a_records_field_file_that_is_not_an_object_of_records_is_one_line(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "train.json").write_text(json.dumps([{"input": "a", "output": "b"}]))
    (tmp_path / "t" / "test.json").write_text(json.dumps([{"input": "a", "output": "b"}]))
    spec = {"name": "t", "dataset_path": "local", "records_field": "Instances", "doc_to_text": "{{ input }}", "doc_to_target": "{{ output }}", "metric": "rouge_l"}
    with pytest.raises(UserError, match=r"task 't': .*(train|test).json must be a JSON object with a list of records under 'Instances' \(records_field\)"):
        load_task(spec, data_dir=str(tmp_path))
