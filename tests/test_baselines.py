"""The field's continual-learning baselines: each one's defining property, on the tiny model."""

import copy
import json
import random

import numpy as np
import pytest
import torch

from cl_runner.config import build
from cl_runner.peft_utils import lora_layers
from cl_runner.runner import Experiment
from cl_runner.training import TrainingLoop
from cl_runner.training.loss import answer_token_loss
from conftest import SMOKE, compose_config, task_with_inputs

TWO_TASKS = [*SMOKE, "task_sequence.tasks=[second_word,last_word]"]


def method_on_tiny(name, tiny_model_and_tokenizer, *overrides):
    built = build(compose_config([f"method={name}", *overrides]).method, "method")
    return built, built.setup(copy.deepcopy(tiny_model_and_tokenizer[0]))


def probe_for(model, built, tokenizer):
    trainer = compose_config(["model=tiny", "trainer.batch_size=2"]).trainer
    return TrainingLoop(trainer, torch.device("cpu"), tokenizer.pad_token_id).probe(model, list(built.trainable_parameters(model)))


def steps_of(run_dir, task):
    lines = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == "train_step" and e["task"] == task]


@pytest.mark.parametrize("method", ["o_lora", "inc_lora"])
def test_o_lora_orthogonality_falls_and_earlier_adapters_stay_frozen(method, tmp_path):
    experiment = Experiment(compose_config([*TWO_TASKS, f"method={method}", "trainer.epochs=2", "trainer.max_steps=8"]), tmp_path)
    experiment.run()
    second = steps_of(tmp_path, "last_word")
    assert all("orthogonal_loss" in s and "l2_loss" in s for s in second)  # logged apart from the task loss
    ratio = second[-1]["orthogonal_loss"] / second[0]["orthogonal_loss"]
    assert ratio < 0.75 if method == "o_lora" else 0.95 < ratio < 1.05  # inc_lora: the same term, not trained on
    assert all(s["orthogonal_loss"] == 0 for s in steps_of(tmp_path, "second_word"))  # nothing earlier to be orthogonal to
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(next((tmp_path / "checkpoints").glob("task_01_*")) / "adapter_task_0.safetensors"))
    now = get_peft_model_state_dict(experiment.model, adapter_name="task_0")
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)  # task 0's adapter: the bytes it was saved with
    assert experiment.model.base_model.active_adapters == ["task_0", "task_1"]  # summed at inference, no task id


def test_o_lora_terms_match_their_definition(tiny_model_and_tokenizer):
    built, model = method_on_tiny("o_lora", tiny_model_and_tokenizer, "method.orthogonal_weight=0.5", "method.l2_weight=0.1")
    task, examples = task_with_inputs(tiny_model_and_tokenizer[1])
    built.before_task(model, 0, task)
    built.before_task(model, 1, task)
    orthogonal = l2 = 0.0
    for layer in lora_layers(model).values():
        A0, A1, B1 = layer.lora_A["task_0"].weight, layer.lora_A["task_1"].weight, layer.lora_B["task_1"].weight
        orthogonal += sum(abs(float(a0.detach() @ a1.detach())) for a0 in A0 for a1 in A1)
        l2 += float(A1.norm() + B1.norm())
    term = built.extra_loss(model, {}, None)
    assert built.step_report()["orthogonal_loss"] == pytest.approx(orthogonal, rel=1e-4)
    assert built.step_report()["l2_loss"] == pytest.approx(l2, rel=1e-5)
    assert float(term) == pytest.approx(0.5 * orthogonal + 0.1 * l2, rel=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task_1." in n for n in trainable)


def per_example_fisher(model, examples, names):
    """The empirical Fisher by hand: the squared gradient of each example's answer log-likelihood
    (Hugging Face's mean loss times its answer tokens), averaged over examples."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    model.eval()
    for e in examples:
        answer_tokens = sum(label != -100 for label in e.labels[1:])
        loss = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss * answer_tokens
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g.square()
    return {n: t / len(examples) for n, t in total.items()}


def test_ewc_fisher_is_the_mean_squared_gradient_and_the_penalty_pulls_to_the_anchor(tiny_model_and_tokenizer):
    torch.manual_seed(0)  # the adapter's initialisation and the stand-in training below
    built, model = method_on_tiny("ewc", tiny_model_and_tokenizer, "method.weight=3.0", "method.decay=0.5", "method.peft.lora_dropout=0.0")
    tokenizer = tiny_model_and_tokenizer[1]
    task, examples = task_with_inputs(tokenizer)
    built.before_task(model, 0, task)
    with torch.no_grad():
        for p in built.trainable_parameters(model):
            p.normal_(0, 0.05)  # stand-in for training: B away from zero, so every factor has a gradient
    assert built.extra_loss(model, {}, None) is None  # nothing to protect before the first task ends
    built.consolidate(model, 0, examples, probe_for(model, built, tokenizer))
    names = list(built.fisher)
    expected = per_example_fisher(model, examples[:64], names)
    for n in names:
        torch.testing.assert_close(built.fisher[n], expected[n], rtol=1e-3, atol=1e-10)
    assert sum(float(f.sum()) for f in built.fisher.values()) > 0

    trainable = dict(built.named_trainable(model))
    with torch.no_grad():
        for p in trainable.values():
            p.add_(0.01)
    penalty = built.extra_loss(model, {}, None)
    by_hand = sum(float((built.fisher[n] * (p - built.anchor[n]).square()).sum()) for n, p in trainable.items())
    assert float(penalty) == pytest.approx(3.0 / 2 * by_hand, rel=1e-5)
    penalty.backward()
    for n, p in trainable.items():  # d/dtheta = weight * F * (theta - anchor): back towards the anchor
        torch.testing.assert_close(p.grad, 3.0 * built.fisher[n] * (p - built.anchor[n]), rtol=1e-4, atol=1e-10)

    first = {n: f.clone() for n, f in built.fisher.items()}
    built.consolidate(model, 1, examples, probe_for(model, built, tokenizer))
    second = per_example_fisher(model, examples[:64], names)
    for n in names:  # online EWC: the older Fisher decays
        torch.testing.assert_close(built.fisher[n], 0.5 * first[n] + second[n], rtol=1e-3, atol=1e-10)
        assert torch.equal(built.anchor[n], trainable[n].detach())


def test_ewc_true_fisher_samples_answers_from_the_model(tiny_model_and_tokenizer):
    tokenizer = tiny_model_and_tokenizer[1]
    task, examples = task_with_inputs(tokenizer)
    fishers = []
    for kind in ("empirical", "sampled", "sampled"):
        torch.manual_seed(0)  # the same adapter initialisation each time
        built, model = method_on_tiny("ewc", tiny_model_and_tokenizer, f"method.fisher={kind}")
        built.before_task(model, 0, task)
        state = torch.random.get_rng_state()
        built.consolidate(model, 0, examples, probe_for(model, built, tokenizer))
        assert torch.equal(torch.random.get_rng_state(), state)  # its own generator: training's random stream is untouched
        fishers.append(torch.cat([f.flatten() for f in built.fisher.values()]))
    assert not torch.equal(fishers[0], fishers[1]) and torch.equal(fishers[1], fishers[2])  # other answers; seeded


def distillation(student, teacher, T):
    """T^2 * KL(p_teacher || p_student) at temperature T, averaged over answer tokens, written out."""
    p_teacher = torch.softmax(teacher / T, -1)
    kl = (p_teacher * (torch.log_softmax(teacher / T, -1) - torch.log_softmax(student / T, -1))).sum(-1)
    return kl.mean() * T * T


P_TUNING = ["~method.peft", "+method.peft={_target_: peft.PromptEncoderConfig, num_virtual_tokens: 4, encoder_hidden_size: 16}"]


@pytest.mark.parametrize("peft", [["method.peft.lora_dropout=0.0"], P_TUNING], ids=["lora", "p_tuning"])
def test_lwf_distils_from_the_model_before_the_task(peft, tiny_model_and_tokenizer):
    from cl_runner.forward import forward_selected
    from cl_runner.training.batching import training_batch

    torch.manual_seed(0)
    built, model = method_on_tiny("lwf", tiny_model_and_tokenizer, "method.weight=2.0", "method.temperature=3.0", *peft)
    tokenizer = tiny_model_and_tokenizer[1]
    task, examples = task_with_inputs(tokenizer)
    batch = training_batch(model, examples[:4], [1.0] * 4, tokenizer.pad_token_id, "padded", 1024)

    def logits():
        return forward_selected(model, batch["input_ids"], batch["read_rows"], batch["read_cols"], attention_mask=batch["attention_mask"]).logits.float()

    built.before_task(model, 0, task)
    with torch.no_grad():
        for p in built.trainable_parameters(model):
            p.normal_(0, 0.05)
        with model.disable_adapter():
            base = logits()
        after_first = logits()
    # The first task distils from the base model (adapters off).
    term = built.extra_loss(model, batch, answer_token_loss(model, batch))
    assert float(term) == pytest.approx(2.0 * float(distillation(after_first, base, 3.0)), rel=1e-4) and float(term) > 0

    built.before_task(model, 1, task)  # the teacher is now a frozen copy of the adapter as task 0 left it
    assert float(built.extra_loss(model, batch, answer_token_loss(model, batch))) == pytest.approx(0.0, abs=1e-6)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".previous." in n)
    with torch.no_grad():
        for p in built.trainable_parameters(model):
            p.add_(0.05)
        moved = logits()
    term = built.extra_loss(model, batch, answer_token_loss(model, batch))
    assert float(term) == pytest.approx(2.0 * float(distillation(moved, after_first, 3.0)), rel=1e-4) and float(term) > 0
    assert float(distillation(after_first, after_first, 3.0)) == pytest.approx(0.0, abs=1e-7)


def test_gem_projection_is_the_closest_gradient_that_raises_no_memory_loss():
    from cl_runner.methods.gradient_memory import project_to_cone

    np.testing.assert_allclose(project_to_cone(np.array([1.0, -1.0]), np.array([[0.0, 1.0]])), [1.0, 0.0], atol=1e-9)
    rng = np.random.default_rng(0)
    for _ in range(20):
        G, g = rng.normal(size=(3, 40)), rng.normal(size=40)
        z = project_to_cone(g, G)
        v = np.linalg.lstsq(G.T, z - g, rcond=None)[0]  # z = g + G^T v
        assert (G @ z >= -1e-6).all() and (v >= -1e-9).all()
        assert abs(v @ (G @ z)) < 1e-6  # complementary slackness: only active constraints push (KKT, so z is the optimum)
        np.testing.assert_allclose(G.T @ v + g, z, atol=1e-9)
    satisfied = np.array([1.0, 1.0])
    np.testing.assert_allclose(project_to_cone(satisfied, np.array([[1.0, 0.0]])), satisfied)


def test_gem_projection_is_exact_for_correlated_task_gradients_and_honours_the_margin():
    from cl_runner.methods.gradient_memory import project_to_cone

    nnls = pytest.importorskip("scipy.optimize").nnls
    rng = np.random.default_rng(1)
    shared = rng.normal(size=3000)  # LLM task gradients are highly correlated: an ill-conditioned dual
    G = np.stack([shared + 0.02 * rng.normal(size=3000) for _ in range(5)])
    g = -shared + 0.2 * rng.normal(size=3000)
    assert np.linalg.cond(G @ G.T) > 1e3
    v, _ = nnls(G.T, -g)  # min ||G^T v + g|| over v >= 0: the same dual
    np.testing.assert_allclose(project_to_cone(g, G), g + G.T @ v, atol=1e-9)
    z = project_to_cone(g, G, margin=0.5)
    dual = np.linalg.lstsq(G.T, z - g, rcond=None)[0]
    assert (dual >= 0.5 - 1e-9).all() and (G @ z >= -1e-6).all()
    assert abs((dual - 0.5) @ (G @ z)) < 1e-6 * np.abs(G @ z).max()  # KKT: a dual above the margin only where its constraint is tight


class FixedProbe:
    """Stands in for the gradient probe: the memory's gradient is a given vector."""

    def __init__(self, gradient):
        self.gradient, self.calls = gradient, []

    def of(self, examples):
        self.calls.append(len(examples))
        return [g.clone() for g in self.gradient]


@pytest.mark.parametrize("variant", ["agem", "gem"])
def test_gradient_memory_projects_only_conflicting_steps(variant, tiny_model_and_tokenizer):
    from cl_runner.formatting import TokenizedExample

    built, _ = method_on_tiny(variant, tiny_model_and_tokenizer)
    built.memories = [[TokenizedExample([1, 2], [-100, 2])] * 3]
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))]
    reference = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    params[0].grad, params[1].grad = torch.tensor([-2.0, 1.0]), torch.tensor([0.0])
    built.adjust_gradients(None, params, FixedProbe(reference), step=1)
    g = torch.cat([p.grad for p in params])  # g = (-2, 1, 0), g_ref = (1, 0, 1): g - (g.r / r.r) r = (-1, 1, 1)
    torch.testing.assert_close(g, torch.tensor([-1.0, 1.0, 1.0]))
    assert float(g @ torch.tensor([1.0, 0.0, 1.0])) == pytest.approx(0.0, abs=1e-7) and built.step_report()["gradient_conflict"] == 1.0
    params[0].grad, params[1].grad = torch.tensor([2.0, 1.0]), torch.tensor([0.0])
    built.adjust_gradients(None, params, FixedProbe(reference), step=2)
    torch.testing.assert_close(torch.cat([p.grad for p in params]), torch.tensor([2.0, 1.0, 0.0]))  # no conflict: unchanged
    assert built.step_report()["gradient_conflict"] == 0.0


def test_agem_draws_its_reference_from_every_task_memory_and_gem_uses_one_gradient_per_task(tiny_model_and_tokenizer):
    from cl_runner.formatting import TokenizedExample

    memories = [[TokenizedExample([t, i], [-100, i]) for i in range(10)] for t in range(3)]
    params = [torch.nn.Parameter(torch.zeros(1))]
    for variant, expected in (("agem", [5]), ("gem", [10, 10, 10])):
        built, _ = method_on_tiny(variant, tiny_model_and_tokenizer, *(["method.reference_size=5"] if variant == "agem" else []))
        built.memories = memories
        params[0].grad = torch.tensor([1.0])
        probe = FixedProbe([torch.tensor([1.0])])
        built.adjust_gradients(None, params, probe, step=1)
        assert probe.calls == expected


def test_gradient_memory_keeps_a_seeded_sample_of_each_task_and_restores_it(tiny_model_and_tokenizer, tmp_path):
    built, model = method_on_tiny("gem", tiny_model_and_tokenizer, "method.memory_per_task=3")
    tokenizer = tiny_model_and_tokenizer[1]
    _, first = task_with_inputs(tokenizer, "one")
    _, second = task_with_inputs(tokenizer, "two")
    built.consolidate(model, 0, first, None)
    built.consolidate(model, 1, second, None)
    assert [len(m) for m in built.memories] == [3, 3]
    assert all(e in first for e in built.memories[0]) and all(e in second for e in built.memories[1])
    again, _ = method_on_tiny("gem", tiny_model_and_tokenizer, "method.memory_per_task=3")
    again.consolidate(model, 0, first, None)
    assert again.memories[0] == built.memories[0]
    built.save_checkpoint(model, tmp_path, 1)  # the memory of every task so far goes with the last task's checkpoint
    restored, fresh_model = method_on_tiny("gem", tiny_model_and_tokenizer, "method.memory_per_task=3")
    restored.load_checkpoint(fresh_model, [tmp_path, tmp_path])
    assert restored.memories == built.memories


def test_multitask_trains_once_on_every_task_so_later_rows_are_equal(tmp_path):
    tasks = "task_sequence.tasks=[second_word,third_word,last_word]"
    experiment = Experiment(compose_config([*SMOKE, "method=multitask", tasks, "trainer.max_steps=null"]), tmp_path)
    results = experiment.run()
    matrix = results["acc_matrix"]
    assert matrix[1] == matrix[2] == matrix[3] and matrix[1] != matrix[0]
    assert results["metrics"]["bwt"] == 0.0
    # One pass over the three tasks' 16 examples each, 4 per batch, on the first task; nothing later.
    assert [t["steps"] for t in results["train"]] == [12, 0, 0]


def test_task_replay_mixes_earlier_tasks_only(tiny_model_and_tokenizer):
    replay = build(compose_config(["replay=task", "replay.per_task=5", "replay.ratio=0.2"]).replay, "replay")
    assert replay.data_tasks(["conf/tasks"]) == []  # no general instruction data
    _, first = task_with_inputs(tiny_model_and_tokenizer[1], "one")
    replay.setup(lambda task: [], [])
    assert replay.sample(8, random.Random(0)) == []
    replay.add_task(0, first)
    drawn = replay.sample(8, random.Random(0))
    assert len(drawn) == 2 and all(e in first for e in drawn)  # round(8 * 0.2 / 0.8) = 2
    assert len(replay.pool) == 5


def test_moe_lora_layer_is_the_base_plus_the_gated_sum_of_its_experts():
    from cl_runner.methods.moe_lora import MixtureOfLoRALinear

    torch.manual_seed(0)
    layer = MixtureOfLoRALinear(torch.nn.Linear(6, 5), r=2, alpha=4, dropout=0.0)
    for _ in range(3):
        layer.add_expert()
    with torch.no_grad():
        for p in [*layer.lora_B, *layer.router]:
            p.normal_()
    x = torch.randn(2, 7, 6)
    logits = torch.stack([x @ w for w in layer.router], dim=-1)
    gates = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    expected = layer.base(x) + 2.0 * sum(gates[..., e : e + 1] * (x @ layer.lora_A[e].T @ layer.lora_B[e].T) for e in range(3))
    torch.testing.assert_close(layer(x), expected)
    layer.experts_on = False
    assert torch.equal(layer(x), layer.base(x))


def test_moe_lora_adds_a_frozen_expert_per_task_trains_the_router_and_reports_its_choice(tmp_path):
    from safetensors.torch import load_file

    from cl_runner.methods.moe_lora import mixture_layers

    experiment = Experiment(compose_config([*TWO_TASKS, "method=moe_lora"]), tmp_path)
    results = experiment.run()
    first, second = (load_file(str(next((tmp_path / "checkpoints").glob(f"task_0{t}_*")) / "mixture_of_lora.safetensors")) for t in (1, 2))
    layers = mixture_layers(experiment.model)
    assert all(len(layer.lora_A) == 2 for layer in layers.values())
    for name, layer in layers.items():
        assert torch.equal(layer.lora_B[0], first[f"{name}.lora_B"]) and torch.equal(layer.lora_A[0], first[f"{name}.lora_A"])  # frozen after task 0
        assert first[f"{name}.router"].shape[0] == 1 and second[f"{name}.router"].shape[0] == 2
    assert any(second[f"{name}.router"].abs().sum() > 0 for name in layers)  # the router trained with the second task
    choices = results["method_reports"][2]["router_choice"]
    assert list(choices) == ["0", "1"] and choices["0"] == [1.0]
    assert sum(choices["1"]) == pytest.approx(1.0, abs=1e-5) and len(choices["1"]) == 2


@pytest.mark.parametrize("method,logged", [("ewc", "ewc_penalty"), ("agem", "gradient_conflict")])
def test_what_a_task_leaves_protects_the_next_one_in_a_real_run(method, logged, tmp_path):
    """The runner consolidates each task (EWC's Fisher, A-GEM's memory) and the loop lets the method act on the next task's steps."""
    Experiment(compose_config([*TWO_TASKS, f"method={method}"]), tmp_path).run()
    assert not any(logged in s for s in steps_of(tmp_path, "second_word"))  # nothing to protect yet
    values = [s[logged] for s in steps_of(tmp_path, "last_word")]
    assert len(values) == 4
    if method == "ewc":
        assert values[0] == 0.0 and values[-1] > 0  # at the anchor when the task starts, then pulled away from it


def test_sampled_fisher_gradients_use_answers_drawn_from_the_model(tiny_model_and_tokenizer):
    """The true Fisher's gradient: targets drawn from the model's next-token distribution at the answer positions."""
    import torch.nn.functional as F

    from cl_runner.forward import forward_selected
    from cl_runner.training.batching import training_batch

    torch.manual_seed(0)
    built, model = method_on_tiny("ewc", tiny_model_and_tokenizer, "method.peft.lora_dropout=0.0")
    tokenizer = tiny_model_and_tokenizer[1]
    task, examples = task_with_inputs(tokenizer)
    built.before_task(model, 0, task)
    params = built.trainable_parameters(model)
    probe = probe_for(model, built, tokenizer)
    [got] = list(probe.per_batch(examples[:1], 1, sample_from=torch.Generator().manual_seed(7), summed=True))

    model.eval()
    batch = training_batch(model, examples[:1], [1.0], tokenizer.pad_token_id, "padded", 1024)
    logits = forward_selected(model, batch["input_ids"], batch["read_rows"], batch["read_cols"], attention_mask=batch["attention_mask"]).logits.float()
    drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
    assert not torch.equal(drawn, batch["targets"])  # other answers than the data's
    want = torch.autograd.grad(F.cross_entropy(logits, drawn, reduction="sum"), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-9)
