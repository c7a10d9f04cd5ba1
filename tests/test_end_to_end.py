"""The whole pipeline on the tiny model: files, matrix, metrics, multirun, W&B offline."""

import json

import pytest

from cl_runner import metrics
from cl_runner.runner import run
from conftest import SMOKE, compose_config, run_cli


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke")
    results = run(compose_config(SMOKE), run_dir)
    return run_dir, results


def test_results_json_has_complete_matrix_and_recomputable_metrics(smoke_run):
    run_dir, returned = smoke_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(returned))
    tasks, R = results["tasks"], results["acc_matrix"]
    assert tasks == ["second_word", "third_word", "fourth_word", "last_word"]
    assert len(R) == len(tasks) + 1 and all(len(row) == len(tasks) for row in R)
    assert all(0.0 <= v <= 1.0 for row in R for v in row)
    recomputed = metrics.all_metrics(R, results["general"])
    for key in ("acc", "avg_acc", "bwt", "fwt", "forgetting", "new_acc", "per_task_forgetting", "general_delta"):
        assert results["metrics"][key] == pytest.approx(recomputed[key]), key
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


def test_per_task_lora_keeps_earlier_adapters_frozen(tmp_path):
    """The defining property: training task t changes neither earlier adapters nor the base."""
    from safetensors.torch import load_file

    run(compose_config([*SMOKE, "method=per_task_lora"]), tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    R = results["acc_matrix"]
    first_after_task1 = load_file(str(tmp_path / "checkpoints" / "task_01_second_word" / "adapter_task_0.safetensors"))
    lora_b = [v for k, v in first_after_task1.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: task 1 trained it
    # Task 1 is always scored with its own adapter, so its column never moves after step 1,
    # and tasks not yet learnt are scored on the base model: their entries equal row 0.
    assert all(R[t][0] == R[1][0] for t in range(1, 5))
    assert all(R[t][i] == R[0][i] for t in range(5) for i in range(t, 4))
    assert results["metrics"]["bwt"] == 0.0 and results["metrics"]["fwt"] == 0.0


def test_wandb_offline_logger_writes_a_run(tmp_path):
    run(compose_config([*SMOKE, "logger=wandb", "task_sequence.tasks=[second_word,last_word]"]), tmp_path)
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))
    assert (tmp_path / "results.json").exists()


def test_wandb_failure_only_warns(tmp_path, caplog):
    run(compose_config([*SMOKE, "logger=wandb", "logger.mode=not_a_mode", "task_sequence.tasks=[second_word]"]), tmp_path)
    assert "W&B start failed" in caplog.text
    assert json.loads((tmp_path / "results.json").read_text())["acc_matrix"]
