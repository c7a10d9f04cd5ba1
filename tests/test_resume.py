"""A run killed with SIGKILL mid-task resumes after its last completed task, with identical results, for every method."""

import json
import os
import subprocess
import sys

import pytest

from conftest import QUIET, REPO
from test_configs import EDIT_METHODS, options, tiny_layers

# The suites whose setup records the base model (what a resume must restore); the others are
# stateless, and tests/test_suites.py covers them.
STATEFUL_SUITES = ["~eval.suites.code", "~eval.suites.instruction_following", "~eval.suites.arithmetic", "~eval.suites.commonsense"]
# Six optimizer steps per task; the kill lands after the third task's second logged step.
SHORT = ["experiment=smoke", *QUIET, "logger=none", "trainer.num_threads=1", *STATEFUL_SUITES, "trainer.max_steps=6",
         "task_sequence.tasks=[second_word,third_word,last_word]"]


# Editors learn edit tasks: six built-in edits in three tasks of two (cf_1, cf_2, cf_3).
EDITS = ["experiment=smoke", *QUIET, "logger=none", "trainer.num_threads=1", *STATEFUL_SUITES, "task_sequence.train_size=6", "task_sequence.probe_size=4",
         "task_sequence.tasks=[{include: counterfact_batches, name: cf, edit_batch_size: 2}]", "method.v_num_grad_steps=5", "method.covariance.tokens=2000",
         "+task_sequence.fluency={prompts: 2, max_new_tokens: 8}"]


# Edit + LoRA: a knowledge task, then two skills (the kill lands in the last one).
MIXED = [*SHORT[:-1], "task_sequence.tasks=[{include: counterfacts, name: facts, edit_records: [0, 2]},third_word,last_word]",
         "+task_sequence.fluency={prompts: 2, max_new_tokens: 8}"]


def cli(run_dir, method):
    args = EDITS if method in EDIT_METHODS else MIXED if method == "edit_plus_lora" else SHORT
    return [*args, f"method={method}", *tiny_layers(method), f"hydra.run.dir={run_dir}"]


def kill_point(method):
    if method == "multitask":  # it trains on every task's data with the first task, nothing after: killed while the third row is scored
        return "last_word:eval"
    return "cf_03:2" if method in EDIT_METHODS else "last_word:2"


def _command(args, env):
    return [sys.executable, "-m", "cl_runner", *args] if not env else [sys.executable, str(REPO / "tests" / "hooked_cli.py"), *args]


def run(args, cwd, **env):
    return subprocess.run(_command(args, env), cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore", **env}, capture_output=True, text=True, timeout=300)


def start(args, cwd) -> subprocess.Popen:
    """A run in the background (the uninterrupted reference runs while the killed one is killed and resumed)."""
    return subprocess.Popen(_command(args, {}), cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# Methods whose class, saved state and resume code another parametrisation runs (kept under the
# suite's time budget): ia3, p_tuning and prompt_tuning resume as seq_lora and prefix_tuning do
# (PeftAdapter, one adapter through the sequence); lora_merge as per_task_lora (an adapter per
# task); inc_lora is o_lora's class without the penalty; agem is gem's class (the same memories)
# with another projection.
SAME_PATH_AS_ANOTHER = {"ia3", "p_tuning", "prompt_tuning", "lora_merge", "inc_lora", "agem"}


@pytest.mark.parametrize("method", [m for m in options("method") if m not in SAME_PATH_AS_ANOTHER])
def test_kill_mid_task_then_resume_matches_uninterrupted(method, tmp_path):
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    clean = start(cli(clean_dir, method), tmp_path)
    killed = run(cli(killed_dir, method), tmp_path, CL_RUNNER_TEST_AT=kill_point(method), CL_RUNNER_TEST_DO="kill")
    assert killed.returncode == -9, killed.stderr[-3000:]

    state = json.loads((killed_dir / "state.json").read_text())
    assert len(state["acc_matrix"]) == 3  # base + two completed tasks; the third was lost
    assert not (killed_dir / "results.json").exists()
    trained_before_kill = state["timing"]["train_s"]

    resumed = run(cli(killed_dir, method), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming" in resumed.stderr + resumed.stdout
    output, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, output[-3000:]

    got = json.loads((killed_dir / "results.json").read_text())
    want = json.loads((clean_dir / "results.json").read_text())
    assert got["acc_matrix"] == want["acc_matrix"]
    assert got["metrics"] == want["metrics"]
    assert got["general"] == want["general"]
    assert got["task_scores"] == want["task_scores"]  # edit tasks: locality against the base model's tokens, taken before the checkpoints load
    assert got["fluency"] == want["fluency"]
    assert got["abilities"] == want["abilities"] and got["abilities"]  # the rows before the kill come back from state.json
    assert got["timing"]["train_s"][:2] == trained_before_kill  # tasks 1-2 were not trained again
    assert [s["final_loss"] for s in got["train"]] == [s["final_loss"] for s in want["train"]]
    events = [json.loads(l) for l in (killed_dir / "train_log.jsonl").read_text().splitlines()]
    assert [e["tasks_completed"] for e in events if e["event"] == "start"] == [0, 2]


@pytest.mark.parametrize("method,extra", [("seq_lora", ["replay=instruction", "replay.ratio=0.3", "trainer.epochs=2"]),  # 8 steps, capped at 6
                                          ("seq_ft", ["trainer.grad_accum_steps=2", "trainer.epochs=3"])])  # 12 micro-batches: 6 steps
def test_kill_inside_a_task_resumes_from_its_last_step_checkpoint(method, extra, tmp_path):
    """checkpoint_every=2 over 6 steps, killed after step 5 of the last task: the resumed run trains
    only steps 5-6 of it (step 4's checkpoint) and ends exactly as an uninterrupted run does,
    replayed examples and dropout included."""
    args = [*SHORT, "trainer.checkpoint_every=2", f"method={method}", *extra]
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    clean = start([*args, f"hydra.run.dir={clean_dir}"], tmp_path)
    killed = run([*args, f"hydra.run.dir={killed_dir}"], tmp_path, CL_RUNNER_TEST_AT="last_word:5", CL_RUNNER_TEST_DO="kill")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (killed_dir / "checkpoints" / "in_progress.pt").exists()

    resumed = run([*args, f"hydra.run.dir={killed_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output, _ = clean.communicate(timeout=300)
    assert clean.returncode == 0, output[-3000:]

    got = json.loads((killed_dir / "results.json").read_text())
    want = json.loads((clean_dir / "results.json").read_text())
    assert got["acc_matrix"] == want["acc_matrix"] and got["general"] == want["general"]
    assert [s["final_loss"] for s in got["train"]] == [s["final_loss"] for s in want["train"]]
    assert got["train"][-1]["tokens"] == want["train"][-1]["tokens"]
    events = [json.loads(l) for l in (killed_dir / "train_log.jsonl").read_text().splitlines()]
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    resumed_steps = [e["step"] for e in events[last_start:] if e["event"] == "train_step"]
    assert resumed_steps == [5, 6]  # steps 1-4 of last_word came from the checkpoint
    clean_events = [json.loads(l) for l in (clean_dir / "train_log.jsonl").read_text().splitlines()]
    losses = lambda evs: [(e["task"], e["step"], e["loss"]) for e in evs if e["event"] == "train_step" and e["task"] == "last_word" and e["step"] >= 5]  # noqa: E731
    assert losses(events[last_start:]) == losses(clean_events)
    assert not (killed_dir / "checkpoints" / "in_progress.pt").exists()  # removed once the task was committed
