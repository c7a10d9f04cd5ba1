"""The PEFT families: any peft config by YAML, row 0 always the base model, and each method's defining property."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from cl_runner.config import build
from cl_runner.peft_utils import lora_layers
from cl_runner.runner import run
from conftest import SMOKE, compose_config, task_with_inputs
from test_configs import check_trains_exactly_its_parameters, options, tiny_layers


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
        built = build(compose_config([f"method={method}", *tiny_layers(method)]).method, "method")
        model = built.setup(copy.deepcopy(base)).eval()
        built.before_task(model, 0, task_with_inputs(tokenizer)[0])
        for member in built.eval_members(model, 0, 0):  # what the runner scores row 0 with
            with member():
                assert torch.equal(model(input_ids=ids).logits, want)


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
        weight = layer.get_base_layer().weight.detach().float()
        U, _, Vh = torch.linalg.svd(weight, full_matrices=False)
        params = layer.osf_svd_params[name]
        grad_u, grad_v = params["U_low"].grad, params["V_low"].grad
        assert grad_u.norm() > 0 and grad_v.norm() > 0
        tolerance = 1e-5 if weight.dtype == layer.get_base_layer().weight.dtype else 1e-2  # bf16 weights: their SVD is rounder
        assert (U[:, :k].T @ grad_u.float()).norm() < tolerance * grad_u.norm(), module_name
        assert (grad_v.float() @ Vh[:k].T).norm() < tolerance * grad_v.norm(), module_name
    model.zero_grad()


def test_osf_projects_gradients_in_bf16_too(tiny_model_and_tokenizer):
    """PEFT casts bf16 models' trainable factors to fp32 copies without its projection hooks; the method re-attaches them."""
    built = build(compose_config(["method=osf"]).method, "method")
    model = built.setup(copy.deepcopy(tiny_model_and_tokenizer[0]).to(torch.bfloat16))
    osf_gradients_avoid_frozen_directions(model, 0, tiny_model_and_tokenizer[1])


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
    built.before_task(model, 1, task_with_inputs(tokenizer)[0])  # merges task 0's update, re-splits with a larger frozen share
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


@pytest.mark.parametrize("merge_method", ["mean", "svd", "ties"])
def test_lora_merge_answers_with_the_merged_adapter(merge_method, tiny_model_and_tokenizer):
    """The merge of the learnt adapters answers every task; "mean" is exactly the mean of the task deltas."""
    base, tokenizer = tiny_model_and_tokenizer
    overrides = ["method=lora_merge", f"method.merge.method={merge_method}"] + (["method.merge.density=0.5"] if merge_method == "ties" else [])
    built = build(compose_config(overrides).method, "method")
    model = built.setup(copy.deepcopy(base)).eval()
    generator = torch.Generator().manual_seed(0)
    for t in range(3):
        built.before_task(model, t, task_with_inputs(tokenizer)[0])
        with torch.no_grad():
            for layer in lora_layers(model).values():  # stand-in for training: a different delta per task
                layer.lora_B[f"task_{t}"].weight.copy_(torch.randn(layer.lora_B[f"task_{t}"].weight.shape, generator=generator) * 0.1)
    ids = prompt_ids(tokenizer)
    if merge_method == "mean":  # two tasks learnt, then three: the merge follows
        for learnt in (2, 3):
            with built.eval_context(model, learnt, 0), torch.no_grad():
                for layer in lora_layers(model).values():
                    mean_delta = sum(layer.get_delta_weight(f"task_{t}") for t in range(learnt)) / learnt
                    torch.testing.assert_close(layer.get_delta_weight("merged"), mean_delta, atol=1e-6, rtol=1e-5)
    for task_index in (0, 2):  # no task id: the same merged model for every task
        with built.eval_context(model, 3, task_index), torch.no_grad():
            assert model.active_adapter == "merged"
            if merge_method == "mean":
                for layer in lora_layers(model).values():
                    mean_delta = sum(layer.get_delta_weight(f"task_{t}") for t in range(3)) / 3
                    torch.testing.assert_close(layer.get_delta_weight("merged"), mean_delta, atol=1e-6, rtol=1e-5)
            merged_logits = model(input_ids=ids).logits
    assert model.active_adapter == "task_2"  # the trained adapter is active again after evaluation
    with torch.no_grad():
        assert not torch.equal(merged_logits, model(input_ids=ids).logits)
    assert {n for n, p in model.named_parameters() if p.requires_grad and ".merged." in n} == set()  # the merge never trains


def test_merge_needs_lora_and_per_task_adapters():
    from cl_runner.errors import UserError

    with pytest.raises(UserError, match="merges LoRA adapters; method.peft is a IA3Config"):
        build(compose_config(["method=ia3", "method.mode=per_task", "+method.inference=merge"]).method, "method")
    with pytest.raises(UserError, match="needs method.mode=per_task"):
        build(compose_config(["method=seq_lora", "+method.inference=ensemble"]).method, "method")
    with pytest.raises(UserError, match="needs method.merge.density"):
        build(compose_config(["method=lora_merge", "method.merge.method=ties"]).method, "method")


def test_ensemble_averages_choice_loglikelihoods_and_votes_on_generations():
    from cl_runner.evaluation import majority_vote, mean_scores

    # two members, two items with three and two choices
    assert mean_scores([[[-1.0, -3.0, -2.0], [-0.5, -4.0]], [[-3.0, -1.0, -2.0], [-2.5, -1.0]]]) == [[-2.0, -2.0, -2.0], [-1.5, -2.5]]
    assert majority_vote(["paris", "rome", "rome"]) == "rome"
    assert majority_vote(["paris", "rome"]) == "paris"  # a tie goes to the earliest member


def test_per_task_ensemble_scores_every_task_with_every_learnt_adapter(tmp_path, monkeypatch):
    from cl_runner import evaluation
    from cl_runner.runner import Experiment

    calls = []  # (task scored, adapter active) for every choice scoring pass
    original = evaluation.choice_loglikelihoods

    def spy(model, requests, *args, **kwargs):
        first_lora = next(iter(lora_layers(model).values()))
        calls.append(None if first_lora.disable_adapters else model.active_adapter)
        return original(model, requests, *args, **kwargs)

    monkeypatch.setattr(evaluation, "choice_loglikelihoods", spy)
    Experiment(compose_config([*SMOKE, "method=per_task_lora", "method.inference=ensemble", "task_sequence.tasks=[second_word,third_word]",
                               "task_sequence.general_probe=null"]), tmp_path).run()
    # Row 0: base (2 tasks); row 1: adapter 0 for both tasks; row 2: adapters 0 and 1 for both tasks.
    assert calls == [None, None, "task_0", "task_0", "task_0", "task_1", "task_0", "task_1"]


def test_inflora_designs_each_a_orthogonal_to_the_stored_basis(tiny_model_and_tokenizer):
    from cl_runner.methods.inflora import adapter_name, input_covariances

    base, tokenizer = tiny_model_and_tokenizer
    built = build(compose_config(["method=inflora", "method.threshold_start=0.9"]).method, "method")
    model = built.setup(copy.deepcopy(base))
    tasks = [task_with_inputs(tokenizer, name, words)[0] for name, words in (("colours", ["red", "blue"] * 4), ("numbers", ["one", "two", "three", "four"] * 2), ("pets", ["cat", "dog"] * 4))]
    for t, task in enumerate(tasks):
        built.before_task(model, t, task)
        covariances = input_covariances(model, lora_layers(model), task.input_batches())  # B_t is still zero: what before_task saw
        for name, layer in lora_layers(model).items():
            A = layer.lora_A[adapter_name(t)].weight.detach().double()
            basis = built.bases.get(name)
            C_hat = covariances[name] if basis is None else covariances[name] - basis @ (basis.T @ covariances[name])
            U = torch.linalg.svd(C_hat).U[:, : A.shape[0]].T / 3 ** 0.5
            assert all(min((a - u).norm(), (a + u).norm()) < 1e-6 for a, u in zip(A, U)), (t, name)  # the top-r directions, up to sign
            A = layer.lora_A[adapter_name(t)].weight.detach().double()
            assert A.norm() > 0
            basis = built.bases.get(name)
            if basis is not None:
                assert (A @ basis).norm() <= 1e-5 * A.norm(), (t, name)  # A_t sees nothing of earlier tasks' input space
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(f"lora_B.{adapter_name(t)}." in n for n in trainable)  # only B_t trains
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B[adapter_name(t)].weight.normal_(0, 0.1)  # stand-in for training
        earlier = {n: b.clone() for n, b in built.bases.items()}
        built.after_task(model, t, task)
        for name, old in earlier.items():  # the basis only grows: earlier tasks' directions stay protected
            new = built.bases[name]
            assert new.shape[1] >= old.shape[1] and (old - new @ (new.T @ old)).norm() < 1e-6, (t, name)
    sizes = [built.bases[n].shape[1] for n in built.bases]
    assert all(0 < k <= 64 for k in sizes)
    assert model.base_model.active_adapters == [adapter_name(t) for t in range(3)]  # all branches summed


def test_control_llm_dlerp_runs_on_a_bf16_model(tiny_model_and_tokenizer):
    base, tokenizer = tiny_model_and_tokenizer
    bf16 = copy.deepcopy(base).to(torch.bfloat16).eval()
    built = build(compose_config(["method=control_llm", "method.expand_every=1", "method.merge=dlerp"]).method, "method")
    model = built.setup(copy.deepcopy(bf16)).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompt_ids(tokenizer)).logits, bf16(input_ids=prompt_ids(tokenizer)).logits)


@pytest.mark.parametrize("merge", ["lerp", "dlerp"])
def test_control_llm_starts_as_the_base_and_trains_only_the_copies(merge, tiny_model_and_tokenizer):
    from cl_runner.methods.control_llm import ExpandedLayer

    base, tokenizer = tiny_model_and_tokenizer
    built = build(compose_config(["method=control_llm", "method.expand_every=1", f"method.merge={merge}", "method.divergence_weight=1.0"]).method, "method")
    model = built.setup(copy.deepcopy(base)).eval()
    ids = prompt_ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base.eval()(input_ids=ids).logits)
    expanded = [m for m in model.modules() if isinstance(m, ExpandedLayer)]
    assert len(expanded) == 2 and all(not p.requires_grad for l in expanded for p in l.pretrained.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    copies = {id(p) for l in expanded for p in [*l.expanded.parameters(), *(l.gate.parameters() if merge == "dlerp" else [])]}
    assert trainable == copies
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.train()
    model(**batch)
    assert built.extra_loss(model, batch, None).item() == 0.0  # identical branches: no divergence yet
    with torch.no_grad():
        for layer in expanded:
            for p in layer.expanded.parameters():
                p.add_(0.05)
    model(**batch)
    loss = built.extra_loss(model, batch, None)
    with torch.no_grad():  # by hand: per layer, the mean over tokens of the mean squared difference; then over layers
        h, by_hand = model.model.embed_tokens(ids), []
        position_embeddings = model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
        for layer in expanded:
            kwargs = {"position_embeddings": position_embeddings, "position_ids": torch.arange(ids.shape[1])[None], "attention_mask": None}
            pre, exp = layer.pretrained(h, **kwargs), layer.expanded(h, **kwargs)
            pre, exp = (pre[0] if isinstance(pre, tuple) else pre), (exp[0] if isinstance(exp, tuple) else exp)
            by_hand.append((exp - pre).pow(2).mean())
            h = layer(h, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
    assert loss.item() == pytest.approx(float(sum(by_hand) / len(by_hand)), rel=1e-4)
    assert loss.item() > 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for l in expanded for p in l.expanded.mlp.parameters())


def test_control_llm_generates_with_a_cache_exactly_as_without(tiny_model_and_tokenizer):
    """Each copy keeps its own KV-cache slot: cached, batched generation equals full forward passes."""
    from cl_runner.evaluation.generation import _greedy_without_generate, generate, stop_token_ids
    from cl_runner.formatting import PromptFormatter
    from cl_runner.tasks import Example

    base, tokenizer = tiny_model_and_tokenizer
    built = build(compose_config(["method=control_llm", "method.expand_every=1"]).method, "method")
    model = built.setup(copy.deepcopy(base)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    formatter = PromptFormatter(tokenizer, True, None, 128)
    examples = [Example("Say hi", "hi"), Example("Count to three, please, slowly", "1 2 3")]
    cached = generate(model, formatter, examples, 6, 2, "cpu")
    stops = stop_token_ids(model, formatter)
    uncached = [tokenizer.decode(_greedy_without_generate(model, formatter.encode_prompt(e, reserve=6), 6, stops, "cpu"), skip_special_tokens=True).strip() for e in examples]
    assert cached == uncached


def test_color_identifies_each_task_from_its_prototypes_and_routes_to_its_adapter(tiny_model_and_tokenizer):
    from cl_runner.formatting import PromptFormatter
    from cl_runner.methods.color import kmeans
    from cl_runner.training.batching import padded_batches

    base, tokenizer = tiny_model_and_tokenizer
    built = build(compose_config(["method=color", "method.clusters_per_task=2"]).method, "method")
    model = built.setup(copy.deepcopy(base)).eval()
    templates = {"colours": "Say the word number {i} ({name}).", "sums": "What is {i} plus {i}? Answer with digits only, {name}."}
    tasks = []
    for t, name in enumerate(templates):
        task, _ = task_with_inputs(tokenizer, name)
        task.train = [type(e)(templates[name].format(i=i, name=name), e.target) for i, e in enumerate(task.train)]
        formatter = PromptFormatter(tokenizer, True, None, 128)
        encoded = [formatter.encode_example(e, 0) for e in task.train]
        from cl_runner.training.batching import input_batches
        task.input_batches = lambda prompts_only=False, encoded=encoded: input_batches(encoded, 4, "cpu", prompts_only)
        built.before_task(model, t, task)
        tasks.append(task)
    assert built.prototypes.shape == (4, 64) and built.prototype_tasks.tolist() == [0, 0, 1, 1]
    assert built.current_task == 1  # the contrastive term's positive is the task being learnt
    formatter = PromptFormatter(tokenizer, True, None, 128)
    for t, task in enumerate(tasks):
        prompts = [formatter.encode_prompt(type(e)(e.prompt.replace("number", "no."), e.target)) for e in task.train]  # unseen but similar prompts
        routes = built.route_examples(model, 2, t, lambda prompts=prompts: padded_batches(prompts, 4, "cpu"))
        assert routes == [t] * len(prompts)
    assert built.row_report(2) == {"task_identification": {"0": 1.0, "1": 1.0}}
    members = built.eval_members(model, 2, 0)
    with members[1]():
        assert model.active_adapter == "task_1"
    # k-means: two well separated clouds give one centroid each
    points = torch.cat([torch.zeros(5, 2), torch.ones(5, 2) * 10]) + torch.randn(10, 2, generator=torch.Generator().manual_seed(0)) * 0.1
    centroids = kmeans(points, 2, seed=0)
    assert sorted(c.round().tolist() for c in centroids) == [[0.0, 0.0], [10.0, 10.0]]


def test_color_reports_task_identification_per_row(tmp_path):
    results = run(compose_config([*SMOKE, "method=color", "task_sequence.tasks=[second_word,last_word]"]), tmp_path)
    reports = results["method_reports"]
    assert reports[0] is None and set(reports[1]["task_identification"]) == {"0"}
    assert set(reports[2]["task_identification"]) == {"0", "1"}
    assert all(0.0 <= v <= 1.0 for r in reports[1:] for v in r["task_identification"].values())


def test_color_contrastive_term_matches_the_hand_computed_infonce():
    """-log softmax([h.c_t, h.c_0, ..] / T)[0] over answer tokens, times the weight; off for the first task and by default."""
    import math
    from types import SimpleNamespace

    built = build(compose_config(["method=color", "method.contrastive_weight=0.5", "method.contrastive_temperature=0.5"]).method, "method")
    built.prototypes = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])  # task 0: two prototypes (mean along x); task 1: along y
    built.prototype_tasks = torch.tensor([0, 0, 1])
    hidden = torch.zeros(1, 3, 2)
    hidden[0, 1] = torch.tensor([0.0, 5.0])  # answer token 1: along y (the current task's direction)
    hidden[0, 2] = torch.tensor([3.0, 4.0])  # answer token 2: cos 0.6 with x, 0.8 with y
    batch = {"read_rows": torch.tensor([0, 0]), "read_cols": torch.tensor([1, 2])}
    outputs = SimpleNamespace(last_hidden_state=hidden)
    built.current_task = 1
    token_1 = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0 / 0.5)))
    token_2 = -math.log(math.exp(0.8 / 0.5) / (math.exp(0.8 / 0.5) + math.exp(0.6 / 0.5)))
    assert built.extra_loss(None, batch, outputs).item() == pytest.approx(0.5 * (token_1 + token_2) / 2, rel=1e-6)
    built.current_task = 0
    assert built.extra_loss(None, batch, outputs) is None
    default = build(compose_config(["method=color"]).method, "method")
    default.current_task = 1
    assert default.extra_loss(None, batch, outputs) is None


def test_routed_examples_are_answered_by_their_member_only(tiny_model_and_tokenizer, monkeypatch):
    import contextlib

    from cl_runner import evaluation
    from cl_runner.formatting import PromptFormatter
    from cl_runner.tasks import Example, Task

    model, tokenizer = tiny_model_and_tokenizer
    formatter = PromptFormatter(tokenizer, True, None, 128)
    task = Task(name="t", dataset_path="json", doc_to_text="q", doc_to_target="a", doc_to_choice=["yes", "no"],
                test=[Example(f"Question {i}?", "yes", ("yes", "no")) for i in range(3)])
    answered = []
    active = {"member": None}

    def member(index):
        @contextlib.contextmanager
        def context():
            active["member"] = index
            yield
        return context

    def spy(model, requests, *args, **kwargs):
        answered.append((active["member"], len(requests)))
        return [[0.0, -1.0] if active["member"] == 0 else [-1.0, 0.0] for _ in requests]  # member 0 says yes, member 1 no

    monkeypatch.setattr(evaluation, "choice_loglikelihoods", spy)
    seen_prompts = []

    def router(prompt_batches):
        seen_prompts.extend(b["input_ids"].shape[0] for b in prompt_batches())
        return [0, 1, 1]

    scores = evaluation.evaluate_task(model, formatter, task, 8, "cpu", [member(0), member(1)], router)
    assert answered == [(0, 1), (1, 2)] and sum(seen_prompts) == 3
    assert scores["acc"] == pytest.approx(1 / 3)  # only the example routed to member 0 is answered "yes"
    answered.clear()
    scores = evaluation.evaluate_task(model, formatter, task, 8, "cpu", [member(0), member(1)])  # no router: an ensemble
    assert answered == [(0, 3), (1, 3)] and scores["acc"] == 1.0  # ties (-0.5 each) go to the first choice


def test_scoring_folds_lora_into_the_weights_without_writing_them(tiny_model_and_tokenizer):
    """seq_lora scores with each LoRA layer's W + scaling·BA in place of W (one product instead of three):
    the logits are the unfolded model's up to rounding, the base weights stay the very tensors with the
    very values, and a weight changed by training (in place, as the optimizer does) is folded afresh."""
    base, tokenizer = tiny_model_and_tokenizer
    ids = prompt_ids(tokenizer)
    method = build(compose_config(["method=seq_lora"]).method, "method")
    model = method.setup(copy.deepcopy(base)).eval()
    layers = list(lora_layers(model).values())
    weights = [layer.get_base_layer().weight for layer in layers]
    saved = [w.detach().clone() for w in weights]
    with torch.no_grad():
        for step in range(2):
            for layer in layers:
                layer.lora_B["default"].weight.normal_(0, 0.05)  # a trained adapter (B starts at zero)
            want = model(input_ids=ids).logits
            with method.eval_context(model, 1, 0):
                assert all(layer.merged for layer in layers)
                assert all(layer.get_base_layer().weight is not w for layer, w in zip(layers, weights))
                got = model(input_ids=ids).logits
            assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(want, base(input_ids=ids).logits, atol=1e-3)
            assert not any(layer.merged for layer in layers)
            assert all(layer.get_base_layer().weight is w for layer, w in zip(layers, weights))
            assert all(torch.equal(w, s) for w, s in zip(weights, saved))


def test_scoring_leaves_a_bf16_model_unfolded(tiny_model_and_tokenizer):
    base, _ = tiny_model_and_tokenizer
    method = build(compose_config(["method=seq_lora"]).method, "method")
    model = method.setup(copy.deepcopy(base).to(torch.bfloat16))
    with method.eval_context(model, 1, 0):
        assert not any(layer.merged for layer in lora_layers(model).values())  # the sum would round a small delta away


@pytest.mark.parametrize("overrides", [["method=seq_lora", "+method.peft.lora_bias=true"], ["method=per_task_lora"], ["method=lora_merge"]],
                         ids=["lora_bias", "per_task_oracle", "lora_merge"])
def test_folded_scoring_answers_as_the_unfolded_adapters_do(overrides, tiny_model_and_tokenizer, monkeypatch):
    """Whatever adapter a row scores with (a task's own, the merge of those learnt so far, one with a
    LoRA bias, which is not folded), the folded model's logits are the unfolded ones', row after row."""
    import contextlib

    base, tokenizer = tiny_model_and_tokenizer
    ids = prompt_ids(tokenizer)
    method = build(compose_config(overrides).method, "method")
    model = method.setup(copy.deepcopy(base)).eval()
    with torch.no_grad():
        for task_index in range(3):
            method.before_task(model, task_index, None)
            model.eval()  # as scoring does (new adapters start in training mode)
            fresh = f".{method.adapter_name(task_index)}."  # each adapter trained once: all carry the same version counters
            for name, parameter in model.named_parameters():
                if ("lora_B" in name or "lora_bias" in name) and fresh in name and (method.mode == "per_task" or task_index == 0):
                    parameter.normal_(0, 0.05)
            for row, task in [(task_index + 1, 0), (task_index + 1, task_index), (task_index + 1, 0)]:
                with method.eval_context(model, row, task):
                    got = model(input_ids=ids).logits
                with monkeypatch.context() as patch:
                    patch.setattr(method.folded, "scoring", lambda m: contextlib.nullcontext())
                    with method.eval_context(model, row, task):
                        want = model(input_ids=ids).logits
                assert torch.allclose(got, want, atol=1e-5), (row, task)
