"""Batching, prompt formatting, replay mixing, scoring: the parts the runner composes."""

import random

import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.evaluation import evaluate_task
from cl_runner.evaluation.text_metrics import contains, exact_match, rouge_l
from cl_runner.formatting import IGNORE_INDEX, PromptFormatter, TokenizedExample
from cl_runner.methods.base import ContinualMethod
from cl_runner.replay import InstructionReplay, NoReplay
from cl_runner.tasks import Example, load_task
from cl_runner.training import TrainingLoop, collate, length_grouped_batches


def padding_share(batches, lengths):
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths) / padded


def test_length_grouping_covers_every_example_once_and_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(512)]
    grouped = length_grouped_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in grouped for i in b) == list(range(512))
    order = list(range(512))
    random.Random(1).shuffle(order)
    plain = [order[i : i + 8] for i in range(0, 512, 8)]
    assert padding_share(grouped, lengths) < padding_share(plain, lengths) / 4


def test_collate_masks_padding():
    batch = collate([TokenizedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_formatter_trains_only_on_the_answer_and_end_of_turn(tiny_model_and_tokenizer):
    tokenizer = tiny_model_and_tokenizer[1]
    formatter = PromptFormatter(tokenizer)
    encoded = formatter.encode_example(Example("Say hi", "hello there"))
    answer = [t for t, l in zip(encoded.input_ids, encoded.labels) if l != IGNORE_INDEX]
    prompt = encoded.input_ids[: len(encoded.input_ids) - len(answer)]
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(answer).startswith("hello there<|im_end|>")
    assert prompt == formatter.prompt_ids("Say hi")


def test_instruction_replay_mixes_the_configured_share():
    replay = InstructionReplay(ratio=0.2, per_task=3, general_task=None)
    assert replay.sample(8, random.Random(0)) == []  # nothing to replay before the first task ends
    task_examples = [TokenizedExample([i], [i]) for i in range(10)]
    replay.add_task(0, task_examples)
    assert len(replay.pool) == 3 and all(e in task_examples for e in replay.pool)
    assert replay.replay_count(8) == 2  # 2 / (8 + 2) = 0.2 of the mixed batch
    assert replay.replay_count(16) == 3  # capped by the pool size
    assert NoReplay().sample(8, random.Random(0)) == []


def test_instruction_replay_loads_general_data(tiny_model_and_tokenizer):
    formatter = PromptFormatter(tiny_model_and_tokenizer[1])
    replay = InstructionReplay(ratio=0.3, per_task=5, general_task="general_instructions")
    replay.setup(lambda task: [formatter.encode_example(e) for e in task.train], replay.data_tasks(["builtin"]))
    assert len(replay.pool) == len(load_task("general_instructions").train) > 0


@pytest.mark.parametrize(
    "prediction,target,em,cont,rouge",
    [
        ("Paris.", "paris", 1.0, 1.0, 1.0),
        ("The capital is Paris", "Paris", 0.0, 1.0, 0.4),  # LCS 1: P=1/4, R=1 -> F1 = 0.4
        ("Parisian food", "Paris", 0.0, 0.0, 0.0),
        ("a b c d", "a c e", 0.0, 0.0, 4 / 7),  # LCS 2: P=2/4, R=2/3 -> F1 = 4/7
    ],
)
def test_generation_metrics(prediction, target, em, cont, rouge):
    assert exact_match(prediction, target) == em
    assert contains(prediction, target) == cont
    assert rouge_l(prediction, target) == pytest.approx(rouge)


def test_task_accuracy_with_multi_token_choices(tiny_model_and_tokenizer):
    """Choices are ranked by the summed log-probability of their training targets: check against a hand-rolled ranking."""
    from cl_runner.tasks import Task

    model, tokenizer = tiny_model_and_tokenizer
    formatter = PromptFormatter(tokenizer)
    choices = ("blue whale", "red panda", "snow leopard")
    prompts = [f"Name an animal, {i}" for i in range(6)]
    expected = []
    for prompt in prompts:
        context = formatter.prompt_ids(prompt)
        with torch.no_grad():
            scores = []
            for choice in choices:
                cont = formatter.answer_ids(prompt, choice)
                logits = model(input_ids=torch.tensor([context + cont])).logits[0].log_softmax(-1)
                scores.append(sum(float(logits[len(context) - 1 + j, t]) for j, t in enumerate(cont)))
        expected.append(choices[scores.index(max(scores))])
    assert all(len(formatter.continuation_ids(c)) > 1 for c in choices)
    # Targets = the hand-ranked winners for half the prompts, a loser for the other half.
    task = Task("animals", "json", "", "", metric="acc")
    task.test = [Example(p, w if i % 2 == 0 else next(c for c in choices if c != w), choices) for i, (p, w) in enumerate(zip(prompts, expected))]
    assert evaluate_task(model, formatter, task, 4, "cpu")["acc"] == pytest.approx(0.5)
    task.test = [Example(p, w, choices) for p, w in zip(prompts, expected)]
    assert evaluate_task(model, formatter, task, 4, "cpu")["acc"] == 1.0


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_tree"])
def test_training_loop_fits_a_tiny_task(tiny_model_and_tokenizer, layout):
    import copy

    model = copy.deepcopy(tiny_model_and_tokenizer[0])
    formatter = PromptFormatter(tiny_model_and_tokenizer[1])
    examples = [formatter.encode_example(Example(f"Say {w}", w)) for w in ("red", "blue", "green", "gold")] * 8
    cfg = OmegaConf.create({"batch_size": 4, "grad_accum_steps": 2, "epochs": 8, "max_steps": None, "lr": 1e-2, "warmup_ratio": 0.1,
                            "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": "fp32", "group_by_length": True, "log_every": 1, "progress_bar": False,
                            "batch_layout": layout, "row_tokens": 64})
    records = []
    loop = TrainingLoop(cfg, torch.device("cpu"), tiny_model_and_tokenizer[1].pad_token_id, on_step=records.append)
    stats = loop.train(model, model.parameters(), examples, ContinualMethod(), NoReplay(), seed=0)
    assert stats["steps"] == len(records) == 8 * 32 // 8
    assert records[-1]["loss"] < records[0]["loss"] * 0.5
    assert stats["tokens"] == 8 * sum(len(e.input_ids) for e in examples)


def test_event_log_ends_a_partial_line_left_by_a_kill(tmp_path):
    from cl_runner.loggers import NullLogger
    from cl_runner.runner import EventLog

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"event": "eval"}\n{"event": "train_st')  # killed mid-write
    EventLog(log, NullLogger()).write({"event": "start"})
    assert log.read_text().splitlines()[-1] == '{"event": "start"}'


def test_edit_similarity_and_sari_against_known_values():
    from cl_runner.evaluation.text_metrics import edit_similarity, sari

    assert edit_similarity("kitten", "sitting") == pytest.approx(2 * 4 / 13)  # LCS "ittn": fuzzywuzzy's ratio 62
    assert edit_similarity("return a + b", "return a + b") == 1.0 and edit_similarity("abc", "xyz") == 0.0
    # Hugging Face evaluate's documented example of its `sari` metric: 26.953601953601954 (/100 here).
    references = ["About 95 species are currently known.", "About 95 species are now accepted.", "95 species are now accepted."]
    assert sari("About 95 you now get in.", references, "About 95 species are currently accepted.") == pytest.approx(0.26953601953601954)
    assert sari("a b c", "a b c", "a b c") == 1.0  # keeping what the reference keeps, deleting and adding nothing
    assert sari("a b", "a b", "a b c") == 1.0 and sari("a b c", "a b", "a b c") < 1.0  # deleting what the reference deletes
