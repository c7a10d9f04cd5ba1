"""Data parallelism on CPU: ``torchrun`` with two gloo processes at batch size b follows one process at 2b.

The whole runner runs in both: the loss curve, the trained weights and the accuracy matrix
(scored with the tasks dealt out to the two ranks and gathered) must match the single
process's, and only rank 0 may write the run directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cl_runner.errors import UserError

from conftest import DATA_PARALLEL as SETTINGS, REPO, SMOKE, run_cli, train_log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd: Path, processes: int, script: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun`` of cl-runner (or of ``script``, e.g. tests/hooked_cli.py)."""
    program = [str(script)] if script else ["-m", "cl_runner"]
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={_free_port()}", *program, *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _adapters(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    return {k: v for f in sorted(last.rglob("*.safetensors")) for k, v in load_file(f).items()}


def test_two_gloo_ranks_at_batch_4_follow_one_process_at_batch_8(tmp_path):
    single = run_cli([*SETTINGS, "trainer.batch_size=8", "hydra.run.dir=single"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = _torchrun([*SETTINGS, "trainer.batch_size=4", "hydra.run.dir=ranks"], tmp_path, processes=2)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one, two = tmp_path / "single", tmp_path / "ranks"

    events_one, losses_one = train_log(one)
    events_two, losses_two = train_log(two)
    assert events_two == events_one  # rank 1 wrote no line of its own (one "start", one record per step and row)
    assert len(losses_one) == 4 * 4  # 4 steps on each of the smoke sequence's 4 tasks
    assert losses_two == pytest.approx(losses_one, rel=1e-5)

    adapters_one, adapters_two = _adapters(one), _adapters(two)
    assert adapters_one.keys() == adapters_two.keys() and adapters_one
    for name, value in adapters_one.items():
        assert torch.allclose(adapters_two[name], value, atol=1e-5), name

    results_one, results_two = (json.loads((d / "results.json").read_text()) for d in (one, two))
    # Every task scored by one of the ranks, the answers gathered in task order.
    assert results_two["acc_matrix"] == results_one["acc_matrix"] and len(set(map(tuple, results_one["acc_matrix"]))) > 1
    assert results_two["task_scores"] == results_one["task_scores"] and results_two["general"] == results_one["general"]
    assert [t["tokens"] for t in results_two["train"]] == [t["tokens"] for t in results_one["train"]]  # the global batches' tokens
    # The ability suites: each scored by one rank, set up on every rank.
    assert results_two["abilities"]["instruction_following"] == results_one["abilities"]["instruction_following"]
    assert results_two["abilities"]["instruction_drift"]["kl"] == pytest.approx(results_one["abilities"]["instruction_drift"]["kl"], rel=1e-3, abs=1e-7)
    assert not list(two.glob("*.tmp*")) and (two / "state.json").exists()


def test_a_gradient_projecting_method_keeps_two_ranks_on_one_process_path(tmp_path):
    """GEM changes the summed gradient after the all-reduce; every rank then steps with rank 0's."""
    settings = [*SETTINGS, "method=gem", "method.memory_per_task=4", "task_sequence.tasks=[second_word,last_word]"]
    single = run_cli([*settings, "trainer.batch_size=8", "hydra.run.dir=single"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = _torchrun([*settings, "trainer.batch_size=4", "hydra.run.dir=ranks"], tmp_path, processes=2)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    (_, losses_one), (_, losses_two) = train_log(tmp_path / "single"), train_log(tmp_path / "ranks")
    assert len(losses_one) == 8 and losses_two == pytest.approx(losses_one, rel=1e-5)
    steps = [json.loads(line) for line in (tmp_path / "ranks" / "train_log.jsonl").read_text().splitlines()]
    assert [s["gradient_conflict"] is not None for s in steps if s.get("task") == "last_word"] == [True] * 4  # the projection step ran
    adapters_one, adapters_two = _adapters(tmp_path / "single"), _adapters(tmp_path / "ranks")
    for name, value in adapters_one.items():
        assert torch.allclose(adapters_two[name], value, atol=1e-5), name


def _collectives(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from cl_runner.distributed import current_world, sum_gradients

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    world = current_world("cpu")
    reached_by_one, reached_by_both, reached_by_none = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    if rank == 0:
        reached_by_one.grad = torch.tensor([1.0, 2.0, 3.0])
    reached_by_both.grad = torch.full((3,), float(rank + 1))
    sum_gradients([reached_by_one, reached_by_both, reached_by_none], world)
    report = world.merge_reports({"task_identification": {str(rank): 0.5 + rank}})
    try:
        world.check_same(rank, "the rank")
        disagreement = None
    except RuntimeError as exc:
        disagreement = str(exc)
    queue.put((rank, reached_by_one.grad.tolist(), reached_by_both.grad.tolist(), reached_by_none.grad, report, disagreement))
    dist.destroy_process_group()


def test_gradients_reports_and_agreement_across_two_ranks():
    """A parameter no rank reached keeps grad=None (AdamW then leaves it alone, as in one process);
    one reached by some ranks gets their sum; method reports merge; disagreement stops both ranks."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue, port = context.Queue(), _free_port()
    processes = [context.Process(target=_collectives, args=(rank, port, queue)) for rank in range(2)]
    for process in processes:
        process.start()
    answers = sorted(queue.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    for rank, one, both, none, report, disagreement in answers:
        assert one == [1.0, 2.0, 3.0] and both == [3.0, 3.0, 3.0] and none is None
        assert report == {"task_identification": {"0": 0.5, "1": 1.5}}
        assert disagreement is not None and "the rank" in disagreement


FSDP_METHODS = {"seq_lora": ["method.peft.lora_dropout=0.0"], "seq_ft": ["method=seq_ft", "trainer.lr=1e-4"]}


def _fsdp_settings(method: str) -> list[str]:
    # 33 examples: four global micro-batches of 8, then one of a single example, which leaves rank 1 without a share.
    kept = [s for s in SETTINGS if not s.startswith(("method.peft", "task_sequence.train_size", "trainer.max_steps"))]
    return [*kept, *FSDP_METHODS[method], "task_sequence.train_size=33", "trainer.max_steps=5", "task_sequence.tasks=[second_word,last_word]"]


def _steps(run_dir: Path) -> list[dict]:
    return [e for e in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines()) if e["event"] == "train_step"]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((run_dir / "checkpoints").rglob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("method", sorted(FSDP_METHODS))
def test_fsdp_shards_the_optimizer_state_and_follows_one_process(method, tmp_path):
    """trainer.sharding=fsdp on two gloo ranks at batch 4: each rank's optimizer steps half the trainable
    elements, and the losses, every checkpoint's weights and the matrix match one process at batch 8,
    through a last micro-batch of one example (the rank without a share still runs the collectives)."""
    settings = _fsdp_settings(method)
    single = run_cli([*settings, "trainer.batch_size=8", "hydra.run.dir=single"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = _torchrun([*settings, "trainer.batch_size=4", "trainer.sharding=fsdp", "hydra.run.dir=ranks"], tmp_path, processes=2)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one, two = tmp_path / "single", tmp_path / "ranks"
    results_one, results_two = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for task_one, task_two in zip(results_one["train"], results_two["train"]):
        assert task_one["optimizer_elements_per_rank"] == task_one["trainable_parameters"]
        # FSDP pads each tensor's first dimension to a multiple of the rank count: about half, not exactly.
        assert task_two["optimizer_elements_per_rank"] <= 0.52 * task_two["trainable_parameters"]
    (events_one, losses_one), (events_two, losses_two) = train_log(one), train_log(two)
    assert events_two == events_one and len(losses_one) == 2 * 5
    assert losses_two == pytest.approx(losses_one, rel=1e-5)
    # Adam would hide a gradient scaled by the rank count (an average instead of the sum); the norm does not.
    norms_one, norms_two = ([e["grad_norm"] for e in _steps(d)] for d in (one, two))
    assert norms_two == pytest.approx(norms_one, rel=1e-4) and len(norms_one) == 10
    weights_one, weights_two = _weights(one), _weights(two)  # gathered back whole into the runner's model after each task
    assert weights_one.keys() == weights_two.keys() and weights_one
    for name, value in weights_one.items():
        assert torch.allclose(weights_two[name], value, atol=1e-5), name
    assert results_two["acc_matrix"] == results_one["acc_matrix"]


def test_fsdp_killed_inside_a_task_resumes_from_its_sharded_state(tmp_path):
    """The mid-task checkpoint gathers the shards of the weights and Adam moments into one file;
    a two-rank FSDP run killed after step 3 of its last task resumes from step 2's checkpoint and ends
    with the losses and weights of an uninterrupted two-rank FSDP run."""
    args = [*_fsdp_settings("seq_ft"), "trainer.batch_size=4", "trainer.sharding=fsdp", "trainer.checkpoint_every=2"]
    clean = _torchrun([*args, "hydra.run.dir=clean"], tmp_path, processes=2)
    assert clean.returncode == 0, clean.stderr[-3000:]
    killed = _torchrun([*args, "hydra.run.dir=killed"], tmp_path, processes=2, script=REPO / "tests" / "hooked_cli.py",
                       env={"CL_RUNNER_TEST_AT": "last_word:3", "CL_RUNNER_TEST_DO": "kill"})
    assert killed.returncode != 0 and (tmp_path / "killed" / "checkpoints" / "in_progress.pt").exists()
    resumed = _torchrun([*args, "hydra.run.dir=killed"], tmp_path, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [json.loads(line) for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    last_start = max(i for i, e in enumerate(events) if e["event"] == "start")
    assert [e["step"] for e in events[last_start:] if e["event"] == "train_step"] == [3, 4, 5]
    _, clean_losses = train_log(tmp_path / "clean")
    assert [e["loss"] for e in events[last_start:] if e["event"] == "train_step"] == pytest.approx(clean_losses[-3:], rel=1e-6)
    weights_clean, weights_resumed = _weights(tmp_path / "clean"), _weights(tmp_path / "killed")
    for name, value in weights_clean.items():
        assert torch.allclose(weights_resumed[name], value, atol=1e-6), name


@pytest.mark.parametrize("setting,message", [("method=ewc", "trainer.sharding=fsdp cannot train method EWC (its consolidate hook"),
                                             ("trainer.precision=fp16", "trainer.sharding=fsdp cannot train in fp16")])
def test_fsdp_refuses_what_it_cannot_train_before_anything_runs(setting, message, tmp_path):
    result = run_cli([*SMOKE, "logger=none", setting, "trainer.sharding=fsdp", "hydra.run.dir=refused"], cwd=tmp_path)
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "refused" / "state.json").exists()


def test_fsdp_refuses_a_model_whose_modules_hang_in_two_places():
    """Houlsby's adapters sit in their decoder layer and in model.houlsby_adapters: FSDP would shard them twice."""
    from cl_runner.config import build
    from cl_runner.models import load_model
    from cl_runner.training.sharding import check_shardable
    from conftest import compose_config

    base, _ = load_model(compose_config(["model=tiny"]).model)
    check_shardable(build(compose_config(["method=seq_lora"]).method, "method").setup(base))
    base, _ = load_model(compose_config(["model=tiny"]).model)
    with pytest.raises(UserError, match="cannot shard this model: module .* is also"):
        check_shardable(build(compose_config(["method=houlsby"]).method, "method").setup(base))
