"""The PEFT families: any peft config by YAML, row 0 always the base model, and each method's defining property."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.config import build
from cl_runner.runner import run
from conftest import SMOKE, compose_config
from test_configs import check_trains_exactly_its_parameters, options


def prompt_ids(tokenizer):
    return torch.tensor([tokenizer.encode("The quick brown fox jumps over the lazy dog")])


@pytest.mark.parametrize("method", options("method"))
def test_row_zero_is_the_base_model_whatever_the_method(method, tiny_model_and_tokenizer):
    """Scored with no task learnt, a freshly set-up method computes exactly the base model's logits
    (prompt and P-tuning start from random virtual tokens: their adapters are switched off)."""
    base, tokenizer = tiny_model_and_tokenizer
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        want = base.eval()(input_ids=ids).logits
        built = build(compose_config([f"method={method}"]).method, "method")
        model = built.setup(copy.deepcopy(base)).eval()
        built.before_task(model, 0, task=None)
        with built.eval_context(model, 0, 0):
            got = model(input_ids=ids).logits
    assert torch.equal(got, want)


def test_houlsby_adapters_sit_after_attention_and_mlp_and_start_as_identity(tiny_model_and_tokenizer):
    base, tokenizer = tiny_model_and_tokenizer
    ids = prompt_ids(tokenizer)
    built = build(compose_config(["method=houlsby"]).method, "method")
    model = built.setup(copy.deepcopy(base)).eval()
    adapters = model.houlsby_adapters
    assert sorted(adapters) == ["0_attention", "0_mlp", "1_attention", "1_mlp"]
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapters.parameters()}
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base.eval()(input_ids=ids).logits)  # bit for bit
        for name in ("1_attention", "0_mlp"):  # each adapter is in the forward pass
            trial = copy.deepcopy(model)
            trial.houlsby_adapters[name].up.bias.fill_(0.1)
            assert not torch.equal(trial(input_ids=ids).logits, base(input_ids=ids).logits), name


def osf_gradients_avoid_frozen_directions(model, task_index, tokenizer):
    """After a backward pass, each trainable factor's gradient has no component along the weight's
    frozen (top effective_rank) singular directions, the ones the adapter was split from."""
    from cl_runner.methods.osf import adapter_name, osf_layers

    name = adapter_name(task_index)
    model.zero_grad()
    model(input_ids=prompt_ids(tokenizer), labels=prompt_ids(tokenizer)).loss.backward()
    for module_name, layer in osf_layers(model).items():
        k = layer.effective_rank[name]
        weight = layer.get_base_layer().weight.detach()
        U, _, Vh = torch.linalg.svd(weight, full_matrices=False)
        params = layer.osf_svd_params[name]
        grad_u, grad_v = params["U_low"].grad, params["V_low"].grad
        assert grad_u.norm() > 0 and grad_v.norm() > 0
        assert (U[:, :k].T @ grad_u).norm() < 1e-5 * grad_u.norm(), module_name
        assert (grad_v @ Vh[:k].T).norm() < 1e-5 * grad_v.norm(), module_name
    model.zero_grad()


def test_osf_projects_gradients_off_the_frozen_directions_and_merges_between_tasks(tiny_model_and_tokenizer, tmp_path):
    from cl_runner.methods.osf import adapter_name, osf_layers

    cfg = compose_config(["method=osf"]).method
    tokenizer = tiny_model_and_tokenizer[1]
    fresh = build(cfg, "method")
    model = fresh.setup(copy.deepcopy(tiny_model_and_tokenizer[0]))
    osf_gradients_avoid_frozen_directions(model, 0, tokenizer)

    model = check_trains_exactly_its_parameters(cfg, tiny_model_and_tokenizer, tmp_path)
    built = build(cfg, "method")
    trained = {n: (layer.get_base_layer().weight + layer.get_delta_weight(adapter_name(0))).detach() for n, layer in osf_layers(model).items()}
    assert any(not torch.equal(w, layer.get_base_layer().weight) for w, layer in zip(trained.values(), osf_layers(model).values()))
    ranks_before = {n: layer.effective_rank[adapter_name(0)] for n, layer in osf_layers(model).items()}
    built.before_task(model, 1, task=None)  # merges task 0's update, re-splits with a larger frozen share
    assert list(model.peft_config) == [adapter_name(1)]
    for n, layer in osf_layers(model).items():
        torch.testing.assert_close(layer.get_base_layer().weight, trained[n])
        assert layer.effective_rank[adapter_name(1)] > ranks_before[n]
    osf_gradients_avoid_frozen_directions(model, 1, tokenizer)  # the new split projects too


@pytest.mark.parametrize("block,mode", [
    ({"_target_": "peft.LoHaConfig", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "sequential"),
    ({"_target_": "peft.LoKrConfig", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "per_task"),
    ({"_target_": "peft.LoraConfig", "r": 4, "use_dora": True, "target_modules": ["q_proj", "v_proj"]}, "sequential"),
])
def test_any_peft_config_class_is_a_method_by_yaml(block, mode, tiny_model_and_tokenizer, tmp_path):
    cfg = compose_config(["method=seq_lora"]).method
    cfg.peft, cfg.mode = OmegaConf.create(block), mode
    check_trains_exactly_its_parameters(cfg, tiny_model_and_tokenizer, tmp_path)


def test_per_task_prompts_each_answer_their_own_task(tmp_path):
    """mode: per_task with prompt tuning: one prompt per task, checkpointed and scored with its task's prompt."""
    from cl_runner.runner import Experiment

    experiment = Experiment(compose_config([*SMOKE, "method=prompt_tuning", "method.mode=per_task", "task_sequence.tasks=[second_word,last_word]"]), tmp_path)
    experiment.run()
    model = experiment.model
    assert sorted(model.peft_config) == ["task_0", "task_1"]
    first, second = (model.prompt_encoder[f"task_{t}"].embedding.weight for t in (0, 1))
    assert not torch.equal(first, second)
    saved = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*.safetensors"))
    assert saved == ["adapter_task_0.safetensors", "adapter_task_1.safetensors"]


def test_every_run_reports_what_each_task_cost(tmp_path):
    results = run(compose_config([*SMOKE, "method=houlsby", "task_sequence.tasks=[second_word,last_word]"]), tmp_path)
    for t, stats in enumerate(results["train"]):
        folder = next((tmp_path / "checkpoints").glob(f"task_{t + 1:02d}_*"))
        assert stats["checkpoint_bytes"] == sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert stats["trainable_parameters"] == 2 * 2 * (64 * 64 * 2 + 64 + 64)  # 2 layers x 2 adapters x (down + up)
        assert stats["peak_memory_bytes"] > 50 * 2**20 and stats["seconds"] > 0
    summary = json.loads((tmp_path / "results.json").read_text())["resources"]
    assert summary["trainable_parameters"] == results["train"][0]["trainable_parameters"]
    assert summary["bytes_per_task"] == sum(s["checkpoint_bytes"] for s in results["train"]) / 2
