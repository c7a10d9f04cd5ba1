"""The whole pipeline on the tiny model: files, matrix, metrics, multirun, replay, learning."""

import json

import pytest

from cl_runner.runner import Experiment, run
from conftest import SMOKE, compose_config, run_cli


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    results = run(compose_config(SMOKE), run_dir)
    return run_dir, results


def test_results_json_has_complete_matrix(smoke_run):
    run_dir, returned = smoke_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    tasks, R = results["tasks"], results["acc_matrix"]
    assert tasks == ["second_word", "third_word", "fourth_word", "last_word"]
    assert len(R) == len(tasks) + 1 and all(len(row) == len(tasks) for row in R)
    assert all(0.0 <= v <= 1.0 for row in R for v in row)
    assert len(results["general"]) == len(tasks) + 1
    assert results["versions"]["torch"] and results["config"]["method"]["name"] == "seq_lora"
    assert set(results["timing"]) >= {"setup_s", "train_s", "eval_s"} and len(results["timing"]["train_s"]) == 4
    assert all(stat["tokens_per_s"] > 0 for stat in results["train"])


def test_run_directory_holds_every_artifact(smoke_run):
    run_dir, _ = smoke_run
    assert (run_dir / "acc_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["task_01_second_word", "task_02_third_word", "task_03_fourth_word", "task_04_last_word"]
    for name in checkpoints:
        assert (run_dir / "checkpoints" / name / "adapter.safetensors").stat().st_size > 0
    events = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert events[0] == {"event": "start", "tasks_completed": 0}
    assert sum(e["event"] == "eval" for e in events) == 5
    steps = [e for e in events if e["event"] == "train_step"]
    assert len(steps) == 16 and {"loss", "lr", "tokens_per_s"} <= set(steps[0])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["acc_matrix"] == json.loads((run_dir / "results.json").read_text())["acc_matrix"]


# A fixed matrix with its metrics worked out by hand (rows: base, after task 1..4).
SCRIPTED_R = [
    [0.2, 0.1, 0.3, 0.0],
    [0.8, 0.2, 0.3, 0.1],
    [0.6, 0.9, 0.4, 0.1],
    [0.5, 0.7, 1.0, 0.2],
    [0.4, 0.8, 0.6, 0.9],
]
SCRIPTED_GENERAL = [0.5, 0.45, 0.4, 0.42, 0.3]
HAND_METRICS = {
    "acc": (0.4 + 0.8 + 0.6 + 0.9) / 4,  # 0.675
    "avg_acc": (0.8 + (0.6 + 0.9) / 2 + (0.5 + 0.7 + 1.0) / 3 + 0.675) / 4,  # 0.7396
    "bwt": ((0.4 - 0.8) + (0.8 - 0.9) + (0.6 - 1.0)) / 3,  # -0.3
    "fwt": ((0.2 - 0.1) + (0.4 - 0.3) + (0.2 - 0.0)) / 3,  # 0.1333
    "per_task_forgetting": [0.8 - 0.4, 0.9 - 0.8, 1.0 - 0.6],
    "forgetting": (0.4 + 0.1 + 0.4) / 3,  # 0.3
    "new_acc": (0.8 + 0.9 + 1.0 + 0.9) / 4,  # 0.9
    "general_base": 0.5,
    "general_final": 0.3,
    "general_delta": -0.2,
}


def test_runner_puts_each_evaluation_in_its_row_and_reports_hand_computed_metrics(tmp_path, monkeypatch):
    """The scores come from a script; everything else (training, rows, probe, metrics, files) is the real pipeline."""
    import cl_runner.runner as runner

    rows, probes = iter(SCRIPTED_R), iter(SCRIPTED_GENERAL)
    monkeypatch.setattr(runner, "evaluate_tasks", lambda model, formatter, tasks, *args: [{"acc": v, "acc_norm": 0.0} for v in next(rows)])
    monkeypatch.setattr(runner, "evaluate_task", lambda *args: {"contains": next(probes)})
    run(compose_config(SMOKE), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["acc_matrix"] == SCRIPTED_R and results["general"] == SCRIPTED_GENERAL
    for key, value in HAND_METRICS.items():
        assert results["metrics"][key] == pytest.approx(value), key


def test_cli_smoke_writes_hydra_snapshot_and_reruns_as_complete(tmp_path):
    result = run_cli(["experiment=smoke"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "experiment=smoke"
    assert (run_dir / ".hydra" / "config.yaml").exists() and (run_dir / "results.json").exists()
    first = (run_dir / "results.json").read_bytes()
    again = run_cli(["experiment=smoke"], cwd=tmp_path)  # same command, same directory: nothing to redo
    assert again.returncode == 0
    assert "is complete: nothing to do" in again.stderr + again.stdout
    assert (run_dir / "results.json").read_bytes() == first


def test_multirun_over_methods(tmp_path):
    result = run_cli(["-m", "method=seq_lora,per_task_lora", "experiment=smoke"], cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "outputs" / "multirun"
    for method in ("seq_lora", "per_task_lora"):
        results = json.loads((sweep / f"experiment=smoke,method={method}" / "results.json").read_text())
        assert results["config"]["method"]["name"] == method and len(results["acc_matrix"]) == 5


def test_per_task_lora_keeps_earlier_adapters_and_the_base_frozen(tmp_path, tiny_model_and_tokenizer):
    """The defining property: training task t changes neither earlier adapters nor the base weights."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    experiment = Experiment(compose_config([*SMOKE, "method=per_task_lora"]), tmp_path)
    experiment.run()
    model = experiment.model
    for t, name in enumerate(experiment.task_names):
        saved = load_file(str(tmp_path / "checkpoints" / f"task_{t + 1:02d}_{name}" / f"adapter_task_{t}.safetensors"))
        final = get_peft_model_state_dict(model, adapter_name=f"task_{t}")
        assert saved.keys() == final.keys()
        # Task t's adapter at the end of the sequence is bit for bit what was saved right after task t.
        assert all(torch.equal(saved[k], final[k]) for k in saved), name
        assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # B starts at zero: it was trained
    base = tiny_model_and_tokenizer[0].state_dict()
    trained_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(trained_base[k], v) for k, v in base.items())


def test_instruction_replay_reaches_the_batches_with_its_share(tmp_path, monkeypatch):
    """replay=instruction through the runner: every micro-batch carries ratio/(1-ratio) replayed examples per current one,
    drawn from the general data and the finished tasks, never from the current task."""
    from cl_runner.training.loop import TrainingLoop

    seen = []  # (task being learnt, current examples, replayed examples) per micro-batch
    accumulate = TrainingLoop.accumulate

    def spy(self, model, method, mixed, *args, **kwargs):
        seen.extend((current_task[0], current, replayed) for current, replayed in mixed)
        return accumulate(self, model, method, mixed, *args, **kwargs)

    current_task = [None]
    learn = Experiment._learn_task

    def learn_spy(self, t):
        current_task[0] = t
        return learn(self, t)

    monkeypatch.setattr(TrainingLoop, "accumulate", spy)
    monkeypatch.setattr(Experiment, "_learn_task", learn_spy)
    experiment = Experiment(compose_config([*SMOKE, "replay=instruction", "replay.ratio=0.5", "replay.per_task=16", "task_sequence.tasks=[second_word,third_word]"]), tmp_path)
    experiment.run()

    encoded = {t.name: {id(e) for e in experiment._encode(t)} for t in experiment.tasks}
    general = {id(e) for e in experiment.replay.pool[: len(experiment.replay.pool) - 16 * 2]}  # the pool starts with the general data
    assert seen and all(len(replayed) == len(current) for _, current, replayed in seen)  # ratio 0.5: one replayed per current
    for t, current, replayed in seen:
        current_ids, replayed_ids = {id(e) for e in current}, {id(e) for e in replayed}
        assert current_ids <= encoded[experiment.task_names[t]]
        allowed = general | set().union(*(encoded[n] for n in experiment.task_names[:t]))
        assert replayed_ids <= allowed and not replayed_ids & encoded[experiment.task_names[t]]
    second_task_replays = {id(e) for t, _, replayed in seen if t == 1 for e in replayed}
    assert second_task_replays & encoded["second_word"]  # the finished task is replayed


LEARNABLE = [
    {"text": f"{filler} {animal} {filler2}", "label": "red" if animal == "cat" else "blue"}
    for filler in ("the", "one", "a", "some") for filler2 in ("runs", "sleeps", "eats", "sits") for animal in ("cat", "dog")
]


def test_the_runner_learns_a_task_a_tiny_model_can_learn(tmp_path):
    """On a task learnable in seconds, the score after training it exceeds the base model's: R[1][0] > R[0][0]."""
    data = tmp_path / "animals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in LEARNABLE))
    task = {
        "name": "animal_colour", "dataset_path": "json", "dataset_kwargs": {"data_files": str(data)}, "test_equals_train": True,
        "doc_to_text": "Which colour? {{ text }}", "doc_to_target": "label", "doc_to_choice": ["red", "blue"], "metric": "acc",
    }
    overrides = [*SMOKE, "method=seq_ft", "trainer.lr=3e-3", "trainer.max_steps=100", "trainer.batch_size=8", "trainer.epochs=100",
                 "task_sequence.general_probe=null", "task_sequence.train_size=null", "task_sequence.eval_size=null"]
    cfg = compose_config(overrides)
    cfg.task_sequence.tasks = [task]
    R = run(cfg, tmp_path / "run")["acc_matrix"]
    assert R[1][0] >= 0.9 and R[1][0] >= R[0][0] + 0.25, R  # untrained: about chance (0.5)


def test_same_seed_on_the_same_cpu_gives_the_same_results_bit_for_bit(tmp_path):
    """What a paper table needs: a rerun reproduces every number, and results.json says what produced it."""
    args = [*SMOKE, "logger=none", "method=seq_lora", "replay=instruction", "seed=3", "task_sequence.tasks=[second_word,last_word]"]
    first, second = (run_cli([*args, f"hydra.run.dir={tmp_path / name}"], tmp_path) for name in ("a", "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    a, b = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("a", "b"))
    for key in ("acc_matrix", "task_scores", "general", "metrics"):
        assert a[key] == b[key], key
    assert [s["final_loss"] for s in a["train"]] == [s["final_loss"] for s in b["train"]]
    [invocation] = a["invocations"]
    assert invocation["device"] == "cpu" and set(invocation["git"] or {"commit": 1, "dirty": 1}) == {"commit", "dirty"}
    assert invocation["command"][0] == "cl-runner" and "seed=3" in invocation["command"]
    assert {"torch", "transformers", "peft"} <= set(invocation["versions"]) and a["config"]["seed"] == 3
