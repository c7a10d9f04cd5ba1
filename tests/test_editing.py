"""Knowledge editing: request schemas, ROME's update on the tiny model, the covariance cache, exact rollback."""

import copy
import itertools
import math
import json
import logging

import pytest
import torch

from cl_runner.editing import covariance
from cl_runner.editing.activations import encode_subject_prompt, io_at, target_ids
from cl_runner.editing.history import EditHistory
from cl_runner.editing.layout import ModuleTemplates, outer_update
from cl_runner.editing.requests import EditRequest, parse_requests
from cl_runner.editing.rome import RomeSettings, rome_update, update_direction
from cl_runner.errors import UserError

REQUEST = EditRequest("0", "The capital of {} is", "France", "Rome", "Paris", ("France's capital is",), (("The capital of Spain is", "Paris"),))


def test_counterfact_and_zsre_records_become_the_same_request():
    counterfact = {"case_id": 7, "requested_rewrite": {"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
                   "paraphrase_prompts": ["France's capital is"], "neighborhood_prompts": ["The capital of Spain is"], "generation_prompts": ["France is"]}
    zsre = {"src": "What is the capital of France?", "subject": "France", "alt": "Rome", "answers": ["Paris"], "rephrase": "France's capital is which city?",
            "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    [cf] = parse_requests([counterfact], "counterfact", "facts.json")
    [zs] = parse_requests([zsre], "zsre", "zsre.json")
    assert (cf.case_id, cf.rewrite_prompt, cf.target_new, cf.target_true) == ("7", "The capital of France is", "Rome", "Paris")
    assert cf.neighborhood == (("The capital of Spain is", "Paris"),) and cf.generation_prompts == ("France is",)
    assert (zs.prompt, zs.rewrite_prompt, zs.target_new, zs.target_true) == ("What is the capital of {}?", "What is the capital of France?", "Rome", "Paris")
    assert zs.paraphrase_prompts == ("France's capital is which city?",) and zs.neighborhood == (("nq question: who wrote hamlet", "Shakespeare"),)


@pytest.mark.parametrize("record,schema,message", [
    ({"requested_rewrite": {"prompt": "The capital of France is", "subject": "France", "target_new": {"str": "Rome"}}}, "counterfact", "must hold '{}'"),
    ({"requested_rewrite": {"prompt": "{} is", "subject": "France", "target_new": {"str": ""}}}, "counterfact", "target_new' must be a non-empty string"),
    ({"requested_rewrite": {"prompt": "{} is", "subject": "France", "target_new": "Rome"}, "neighborhood_prompts": ["x"]}, "counterfact", "need requested_rewrite.target_true"),
    ({"src": "What is it?", "subject": "France", "alt": "Rome"}, "zsre", "does not occur in src"),
    ({"src": "What is France?", "subject": "France"}, "zsre", "missing 'alt'"),
    ({}, "wikidata", "edit schema must be one of"),
])
def test_bad_edit_records_are_one_clear_error(record, schema, message):
    with pytest.raises(UserError, match=message):
        parse_requests([record], schema, "facts.json")


def test_subject_last_token_position(tiny_model_and_tokenizer):
    _, tokenizer = tiny_model_and_tokenizer
    prompt = encode_subject_prompt(tokenizer, "The capital of {} is", "United Kingdom", context="Some text. {}")
    through_subject = tokenizer("Some text. The capital of United Kingdom")["input_ids"]
    assert prompt.subject_last == len(through_subject) - 1
    assert tokenizer.decode(prompt.input_ids[prompt.subject_last]).strip() == "Kingdom"
    assert prompt.input_ids == tokenizer("Some text. The capital of United Kingdom is")["input_ids"]


def test_outer_update_follows_the_modules_weight_layout():
    from transformers.pytorch_utils import Conv1D

    keys, values = torch.randn(6, 1), torch.randn(4, 1)
    linear, conv = torch.nn.Linear(6, 4, bias=False), Conv1D(4, 6)  # Conv1D(nf=out, nx=in) stores (in, out)
    for module in (linear, conv):
        with torch.no_grad():
            module.weight.add_(outer_update(module, keys, values))
    x = keys.T
    torch.testing.assert_close(linear(x) - x @ (linear.weight - values @ keys.T).T, (values * (keys.T @ keys)).T)
    assert outer_update(conv, keys, values).shape == (6, 4)


def test_update_direction_is_c_inverse_k_normalised():
    c = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    u = update_direction(torch.tensor([1.0, 1.0]), c)
    want = torch.tensor([0.5, 2.0]) / torch.tensor([0.5, 2.0]).norm()
    torch.testing.assert_close(u, want)
    torch.testing.assert_close(update_direction(torch.tensor([3.0, 4.0]), None), torch.tensor([0.6, 0.8]))


def greedy_next(model, tokenizer, prompt: str) -> int:
    with torch.no_grad():
        return int(model(torch.tensor([tokenizer(prompt)["input_ids"]])).logits[0, -1].argmax())


def apply(model, deltas):
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_parameter(name).add_(delta)


def test_rome_update_is_rank_one_lowers_the_nll_and_rolls_back_exactly(tiny_model_and_tokenizer):
    """The tiny random model is too weak for an edit to flip its answer (see the SmolLM2 test; its
    attention barely carries a change from an earlier position, so here the subject ends the
    prompt), but the update's shape, the value fit and the exact rollback are checked."""
    base, tokenizer = tiny_model_and_tokenizer
    model = copy.deepcopy(base).eval()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.lm_head.weight.requires_grad_(False)  # (tied to the embeddings) a flag the edit must leave as it found it
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    request = EditRequest("1", "We flew to the capital, {}", "Paris", "Rome", "Paris")  # the subject ends the prompt: see above
    keys = torch.randn(500, 128, generator=torch.Generator().manual_seed(0))
    deltas, fit = rome_update(model, tokenizer, request, ["{}", "Hello there. {}"], RomeSettings(layer=0), keys.T @ keys / len(keys))
    assert list(deltas) == ["model.layers.0.mlp.down_proj.weight"]
    assert torch.linalg.matrix_rank(deltas["model.layers.0.mlp.down_proj.weight"]) == 1  # a rank-one update
    assert fit.final_nll < fit.initial_nll
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # computed, not yet applied
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    history = EditHistory()
    before = history.snapshot(model, list(deltas))
    apply(model, deltas)
    history.record("france", model, before)
    # ROME's defining property: the edited weight maps the bare prompt's key exactly to v*.
    bare = encode_subject_prompt(tokenizer, request.prompt, request.subject)
    _, value = io_at(model, ModuleTemplates().mlp_out_module(model, 0), [bare], tokenizer.pad_token_id)
    torch.testing.assert_close(value[0], fit.value, rtol=1e-4, atol=1e-5)
    assert history.rollback("france", model) is True
    assert max((p - original[n]).abs().max().item() for n, p in model.named_parameters()) == 0


@pytest.fixture(scope="module")
def smollm2():
    from cl_runner.models import load_model
    from conftest import compose_config

    return load_model(compose_config([]).model)


def test_one_rome_edit_flips_smollm2s_completion_and_rollback_restores_it_exactly(smollm2):
    """SmolLM2-135M completes "The capital of France is" with " Paris"; one ROME edit at layer 2
    (no covariance here, to stay fast) makes it " Rome", and rolling the edit back restores
    every weight bit for bit."""
    model, tokenizer = smollm2
    model.eval()
    weight_name = "model.layers.2.mlp.down_proj.weight"
    original = model.get_parameter(weight_name).detach().clone()
    paris, rome = target_ids(tokenizer, "Paris")[0], target_ids(tokenizer, "Rome")[0]
    assert greedy_next(model, tokenizer, REQUEST.rewrite_prompt) == paris
    templates = ["{}", "The weather was fine. {}", "I read this in a book. {}"]
    deltas, fit = rome_update(model, tokenizer, REQUEST, templates, RomeSettings(layer=2, mom2_adjustment=False), None)
    history = EditHistory()
    before = history.snapshot(model, list(deltas))
    apply(model, deltas)
    history.record("france", model, before)
    try:
        assert greedy_next(model, tokenizer, REQUEST.rewrite_prompt) == rome
        assert greedy_next(model, tokenizer, "The capital of Germany is") == target_ids(tokenizer, "Berlin")[0]  # a neighbour kept
    finally:
        assert history.rollback("france", model) is True
    assert (model.get_parameter(weight_name) - original).abs().max().item() == 0
    assert greedy_next(model, tokenizer, REQUEST.rewrite_prompt) == paris


def test_rollback_of_an_earlier_task_subtracts_its_delta_and_says_it_is_not_exact(tmp_path, caplog):
    weight = torch.nn.Linear(8, 8, bias=False)
    model = torch.nn.Sequential(weight)
    start = weight.weight.detach().clone()
    history = EditHistory()
    for task, scale in (("a", 1.0), ("b", 0.5)):
        before = history.snapshot(model, ["0.weight"])
        with torch.no_grad():
            weight.weight.add_(scale * torch.randn(8, 8, generator=torch.Generator().manual_seed(len(task) + int(scale * 10))))
        history.record(task, model, before)
    history.save(tmp_path, "a")
    reloaded = EditHistory()
    reloaded.load(tmp_path)
    after_b = weight.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        assert reloaded.rollback("a", model) is False
    assert "changed by a later task" in caplog.text
    torch.testing.assert_close(weight.weight, after_b - history.changes["a"].get("0.weight").delta)
    assert not torch.equal(weight.weight, start)


def test_covariance_cache_is_reused_on_the_second_run(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    model, tokenizer = tiny_model_and_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i} of a small corpus about rivers, towns and {i * 7} numbers." for i in range(60)))
    settings = covariance.settings_from({"corpus": "files", "paths": [str(corpus)], "tokens": 300})
    module = ModuleTemplates().mlp_out_module(model, 0)
    first = covariance.second_moment(model, tokenizer, module, "model.layers.0.mlp.down_proj", settings, tmp_path / "cache")
    assert first.shape == (128, 128) and torch.allclose(first, first.T)
    assert len(list((tmp_path / "cache").iterdir())) == 1

    def no_second_estimate(*args, **kwargs):
        raise AssertionError("estimated again instead of read from the cache")

    monkeypatch.setattr(covariance, "estimate_second_moment", no_second_estimate)
    again = covariance.second_moment(model, tokenizer, module, "model.layers.0.mlp.down_proj", settings, tmp_path / "cache")
    assert torch.equal(first, again)
    corpus.write_text("Different text now.\n" * 40)  # another corpus: another cache entry, so estimated again
    with pytest.raises(AssertionError, match="estimated again"):
        covariance.second_moment(model, tokenizer, module, "model.layers.0.mlp.down_proj", covariance.settings_from({"corpus": "files", "paths": [str(corpus)], "tokens": 300}), tmp_path / "cache")


def test_second_moment_by_hand(tiny_model_and_tokenizer):
    """E[k k^T] over exactly the non-padding tokens, stopping at the token budget."""
    model, tokenizer = tiny_model_and_tokenizer
    module = ModuleTemplates().mlp_out_module(model, 0)
    sequences = [tokenizer("a short one")["input_ids"], tokenizer("and a somewhat longer second text here")["input_ids"]]
    moment, count = covariance.estimate_second_moment(model, module, iter(sequences), tokenizer.pad_token_id, tokens=10_000, batch_size=2)
    keys = []
    for sequence in sequences:  # one at a time: no padding at all
        from cl_runner.editing.activations import reading

        with reading(module) as seen, torch.no_grad():
            model(input_ids=torch.tensor([sequence]))
        keys.append(seen["input"][0].double())
    keys = torch.cat(keys)
    assert count == len(keys) == sum(map(len, sequences))
    torch.testing.assert_close(moment, (keys.T @ keys / len(keys)).float(), rtol=1e-4, atol=1e-6)


def test_bad_covariance_settings_are_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown key"):
        covariance.settings_from({"corpuss": "files"})
    with pytest.raises(UserError, match="needs existing method.covariance.paths"):
        covariance.settings_from({"corpus": "files", "paths": [str(tmp_path / "missing.txt")]})
    with pytest.raises(UserError, match="one of builtin, generated, files, hub"):
        covariance.settings_from({"corpus": "wiki"})
    json.dumps(covariance.settings_from({}).describe())  # the cache key material is plain JSON


def test_counterfact_scores_by_hand(monkeypatch):
    """Success and magnitude from given NLLs: efficacy/paraphrase want new < true, neighbourhood true < new."""
    from cl_runner.editing import metrics

    nlls = {("The capital of France is", "Rome"): 0.5, ("The capital of France is", "Paris"): 2.0,
            ("France's capital is", "Rome"): 3.0, ("France's capital is", "Paris"): 1.0,
            ("The capital of Spain is", "Rome"): 4.0, ("The capital of Spain is", "Paris"): 1.5}

    def fake_teacher_forced(model, tokenizer, prompts, targets, batch_size=16):
        return [(nlls[(p, t)], [1, 2]) for p, t in zip(prompts, targets)]

    class Tokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [1, 3] if "Rome" in text else [5]}

        def decode(self, ids):
            return "x"

    monkeypatch.setattr(metrics, "teacher_forced", fake_teacher_forced)
    [scores] = metrics.counterfact_scores(None, Tokenizer(), [REQUEST])
    assert scores["efficacy"] == 1.0 and scores["paraphrase"] == 0.0 and scores["neighborhood"] == 1.0
    assert scores["efficacy_magnitude"] == pytest.approx(math.exp(-0.5) - math.exp(-2.0))
    assert scores["paraphrase_magnitude"] == pytest.approx(math.exp(-3.0) - math.exp(-1.0))
    assert scores["neighborhood_magnitude"] == pytest.approx(math.exp(-1.5) - math.exp(-4.0))
    assert scores["rewrite_acc"] == 0.5  # argmax [1, 2] against Rome's tokens [1, 3]
    assert scores["locality"] is None  # no unedited reference given
    [with_reference] = metrics.counterfact_scores(None, Tokenizer(), [REQUEST], reference=[[[1, 9]]])
    assert with_reference["locality"] == 0.5  # the neighbour's argmax [1, 2] against the unedited model's [1, 9]
    total = metrics.aggregate([scores, {**scores, "paraphrase": 1.0}])
    assert total["paraphrase"] == 0.5
    assert total["score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 1.0))


def test_fluency_is_romes_weighted_ngram_entropy():
    from cl_runner.evaluation.fluency import fluency, ngram_entropy

    assert ngram_entropy("a b a b", 2) == pytest.approx(-(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3)))  # ab, ba, ab
    assert ngram_entropy("a a a a", 3) == 0.0
    assert ngram_entropy("A a A a", 2) == ngram_entropy("a b a b", 2)  # case kept, as ROME does
    text = "one two three four"
    assert fluency([text]) == pytest.approx((2 / 3 * math.log2(3) + 4 / 3 * math.log2(2)) / 2)


def test_alphaedit_update_is_blind_to_the_preserved_keys_and_its_cache_belongs_to_the_run(tiny_model_and_tokenizer):
    """AlphaEdit's defining property: dW k = 0 for every key in the span C preserves (its large
    singular directions). The key cache accumulates K K^T of
    each batch and starts empty in every new editor (EasyEdit #613)."""
    from cl_runner.config import build
    from cl_runner.editing.memit import MemitSettings, memit_update, null_space_projector
    from conftest import compose_config

    base, tokenizer = tiny_model_and_tokenizer
    module = ModuleTemplates().mlp_out_module(base, 0)
    texts = [tokenizer(f"The capital of country number {i} is a city with {i * 3} bridges.")["input_ids"] for i in range(40)]
    second_moment, _ = covariance.estimate_second_moment(base, module, iter(texts), tokenizer.pad_token_id, tokens=100_000, batch_size=8)
    u, singular, _ = torch.linalg.svd(second_moment.double())
    threshold = float(singular[8])  # the 8 largest directions are preserved, the rest is the null space
    preserved = u[:, :8].float()
    requests = [REQUEST, EditRequest("1", "The capital of {} is", "Spain", "Oslo", "Madrid")]
    results = {}
    for null_space in (False, True):
        model = copy.deepcopy(base).eval()
        settings = MemitSettings(layers=(0,), null_space=null_space, nullspace_threshold=threshold, mom2_update_weight=1e-6)  # a negligible C term: MEMIT then moves preserved keys
        cache = {}
        projectors = {0: null_space_projector(second_moment, threshold)}
        deltas, _ = memit_update(model, tokenizer, requests, [["{}"]], settings, {0: second_moment}, cache=cache, projectors=projectors)
        results[null_space] = (deltas["model.layers.0.mlp.down_proj.weight"], cache)
    alpha, cache = results[True]
    memit, _ = results[False]
    assert alpha.abs().max() > 0
    # MEMIT's update, R (lambda C + K K^T)^-1 K^T, also leans away from C's large directions, but
    # only AlphaEdit's is orthogonal to them up to float rounding.
    assert (alpha @ preserved).abs().max() <= 1e-6 * alpha.abs().max()
    assert (memit @ preserved).abs().max() > 1e-5 * memit.abs().max()
    assert set(cache) == {0} and torch.linalg.matrix_rank(cache[0].double(), atol=1e-6) == 2  # K K^T of the batch's two keys
    fresh = build(compose_config(["method=alphaedit"]).method, "method")
    assert fresh.session.state == {} and fresh._key_cache() == {}


def test_causal_tracing_finds_the_fact_in_the_mlp_at_the_last_subject_token(smollm2):
    """On a built-in fact, restoring the early MLP outputs at the subject's last token brings the
    answer back more than restoring them at the prompt's last token (the paper's finding)."""
    from cl_runner.editing.tracing import embedding_noise_scale, subject_range, trace

    model, tokenizer = smollm2
    prompt, subject = "The mother tongue of {} is", "Angela Merkel"
    _, first, last = subject_range(tokenizer, prompt, subject)
    assert [tokenizer.decode([i]) for i in subject_range(tokenizer, prompt, subject)[0][first : last + 1]] == [" Angela", " Mer", "kel"]
    noise = embedding_noise_scale(model, tokenizer, ["Angela Merkel", "France", "Toyota", "Leo Tolstoy", "Paris"])
    result = trace(model, tokenizer, prompt, subject, noise, kind="mlp", samples=3, positions=[last, -1], only_layers=list(range(0, 10, 2)))
    assert result.answer.strip() == "German" and result.high > result.low
    early = slice(0, 10, 2)
    assert result.effect[last, early].max() > result.effect[-1, early].max() + 0.02


def test_trace_cli_writes_a_table_and_a_heatmap_per_fact_and_kind(tmp_path, capsys):
    from cl_runner.editing.trace_cli import main

    main(["--facts", "3", "--samples", "2", "--kinds", "hidden", "mlp", "--out", str(tmp_path), "--", "model=tiny"])
    table = json.loads((tmp_path / "3_mlp.json").read_text())
    assert table["prompt"] == "The official language of {} is" and table["kind"] == "mlp"
    assert len(table["scores"]) == len(table["tokens"]) and all(len(row) == 2 for row in table["scores"])  # tiny: 2 layers
    first, last = table["subject_range"]
    assert "".join(table["tokens"][first : last + 1]).strip() == table["subject"]
    assert (tmp_path / "3_hidden.png").stat().st_size > 1000 and (tmp_path / "3_mlp.png").exists()
    assert "largest MLP effect at the last subject token in layer" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no built-in fact with case_id"):
        main(["--facts", "9999", "--out", str(tmp_path)])


def test_rollback_after_the_sequence_gives_back_the_earlier_row_exactly(tmp_path):
    """rollback=[cf_02] after two ROME tasks: bit for bit, so every task scores exactly what it did after cf_01."""
    from cl_runner.runner import run
    from conftest import compose_config

    overrides = ["experiment=smoke", "logger=none", "method=rome", "method.layer=0", "method.v_num_grad_steps=5", "method.covariance.tokens=2000", "task_sequence.train_size=4",
                 "task_sequence.tasks=[{include: counterfact_batches, name: cf, edit_batch_size: 2}]", "task_sequence.general_probe=null", "rollback=[cf_02]",
                 "+task_sequence.fluency={prompts: 3, max_new_tokens: 6}"]
    results = run(compose_config(overrides), tmp_path)
    assert all(scores["locality"] == 1.0 for scores in results["task_scores"][0])  # the base model against its own tokens
    assert len(results["fluency"]) == 3 and all(f > 0 for f in results["fluency"])  # every row, base included
    assert results["rollback"]["bit_exact"] == {"cf_02": True}
    assert results["rollback"]["scores"] == results["acc_matrix"][1]
    assert results["rollback"]["task_scores"] == results["task_scores"][1]
    assert results["acc_matrix"][2] != results["acc_matrix"][1] or results["task_scores"][2] != results["task_scores"][1]  # cf_02 changed something


@pytest.mark.parametrize("overrides,message", [
    (["rollback=[nope]", "method=rome", "method.layer=0"], "rollback: no task named \\['nope'\\]"),
    (["rollback=[second_word]", "method=seq_lora"], "cannot roll tasks back"),
])
def test_bad_rollback_is_refused_before_any_work(overrides, message, tmp_path):
    from cl_runner.runner import run
    from conftest import compose_config

    with pytest.raises(UserError, match=message):
        run(compose_config(["experiment=smoke", "logger=none", *overrides]), tmp_path)
    assert not (tmp_path / "state.json").exists()


def test_rome_layer_auto_picks_the_traced_layer_and_keeps_it_through_resume(tmp_path, monkeypatch):
    """layer: auto edits the layer with the largest traced MLP effect (here forced to layer 1 by a
    stub trace), and a resumed run keeps that layer from the checkpoint instead of tracing again."""
    from cl_runner.editing import tracing
    from cl_runner.runner import run
    from conftest import compose_config

    calls = []

    def stub_trace(model, tokenizer, prompt, subject, noise, kind, positions, **kwargs):
        calls.append(subject)
        effect = torch.zeros(20, 2)
        effect[positions[0], 1] = 1.0
        return tracing.Trace([], (0, 0), "", effect, 0.0, 1.0, kind)

    monkeypatch.setattr(tracing, "trace", stub_trace)
    overrides = ["experiment=smoke", "logger=none", "method=rome", "method.layer=auto", "method.auto_layer_facts=2", "method.v_num_grad_steps=3",
                 "method.covariance.tokens=2000", "task_sequence.train_size=4", "task_sequence.general_probe=null",
                 "task_sequence.tasks=[{include: counterfact_batches, name: cf, edit_batch_size: 2}]"]
    run(compose_config(overrides), tmp_path)
    assert len(calls) == 2  # traced once, on the first task's first two requests
    import safetensors.torch

    from cl_runner.config import build
    from cl_runner.models import load_model

    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert len(checkpoints) == 2
    assert list(safetensors.torch.load_file(str(checkpoints[-1] / "edited_weights.safetensors"))) == ["model.layers.1.mlp.down_proj.weight"]
    resumed = build(compose_config(overrides).method, "method")
    model, _ = load_model(compose_config(["model=tiny"]).model)
    resumed.load_checkpoint(resumed.setup(model), checkpoints)
    assert resumed.settings.layer == 1 and len(calls) == 2


def test_edit_plus_lora_edits_knowledge_trains_skills_and_rolls_back_either(tmp_path):
    """A knowledge task changes only the base weights (by the editor), a skill task only the LoRA
    adapter; rolling back the last task (a skill) gives back the row before it exactly."""
    from cl_runner.runner import run
    from conftest import compose_config

    overrides = ["experiment=smoke", "logger=none", "method=edit_plus_lora", "method.editor.layer=0", "+method.editor.v_num_grad_steps=3",
                 "method.editor.covariance.tokens=2000", "task_sequence.general_probe=null", "trainer.max_steps=3",
                 "task_sequence.tasks=[{include: counterfacts, name: facts, edit_records: [0, 2]},second_word]", "rollback=[second_word]"]
    results = run(compose_config(overrides), tmp_path)
    assert results["rollback"]["bit_exact"] == {"second_word": True}
    assert results["rollback"]["scores"] == results["acc_matrix"][1]
    assert [s["trainable_parameters"] for s in results["train"]][0] == 0 and results["train"][1]["trainable_parameters"] > 0
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    import safetensors.torch
    edited = safetensors.torch.load_file(str(checkpoints[0] / "editor" / "edited_weights.safetensors"))
    assert list(edited) == ["model.layers.0.mlp.down_proj.weight"]
    assert (checkpoints[1] / "skills" / "edit_history.safetensors").exists() and not (checkpoints[0] / "skills" / "edit_history.safetensors").exists()


def test_generated_corpus_is_seeded_and_leaves_the_runs_random_stream_alone(tiny_model_and_tokenizer):
    """Sampling C's corpus must not shift the run's random numbers: a resumed run reads C from the
    cache and draws nothing there, so otherwise it would train with other dropout masks."""
    model, tokenizer = tiny_model_and_tokenizer
    settings = covariance.settings_from({"corpus": "generated", "text_tokens": 6, "batch_size": 2})

    def texts():
        return list(itertools.islice(covariance.generated_texts(model, tokenizer, settings), 2))

    torch.manual_seed(5)
    untouched = torch.rand(3)
    torch.manual_seed(5)
    first = texts()
    assert torch.equal(torch.rand(3), untouched)
    assert texts() == first and all(len(t) >= 6 for t in first)


@pytest.mark.parametrize("setting", ["{prompts: -1}", "{prompts: 2, tokens: 5}", "{prompts: two}", "20", "{prompts: 2, max_new_tokens: 0}"])
def test_bad_fluency_settings_are_one_line(setting, tmp_path):
    from cl_runner.runner import run
    from cl_runner.errors import UserError
    from conftest import compose_config

    overrides = ["experiment=smoke", "logger=none", "method=rome", "method.layer=0", "task_sequence.train_size=2",
                 "task_sequence.tasks=[counterfacts]", f"+task_sequence.fluency={setting}"]
    with pytest.raises(UserError, match="task_sequence.fluency"):
        run(compose_config(overrides), tmp_path)


def test_locality_pairs_each_neighbour_with_its_own_reference_tokens(monkeypatch):
    """Two requests with two neighbours each; the fake model's argmax depends on the prompt, so a
    neighbour compared with another's reference tokens would score differently."""
    from cl_runner.editing import metrics
    from cl_runner.editing.requests import EditRequest

    requests = [EditRequest("a", "The capital of {} is", "France", "Rome", "Paris", neighborhood=(("N1", "Paris"), ("N2", "Paris"))),
                EditRequest("b", "The capital of {} is", "Spain", "Rome", "Madrid", neighborhood=(("N3", "Madrid"), ("N4", "Madrid")))]
    argmax = {"N1": [1, 1], "N2": [2, 2], "N3": [3, 3], "N4": [4, 4]}

    def fake_teacher_forced(model, tokenizer, prompts, targets, batch_size=16):
        return [(1.0, argmax.get(p, [0, 0])) for p in prompts]

    class Tokenizer:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [7, 8]}

        def decode(self, ids):
            return "x"

    monkeypatch.setattr(metrics, "teacher_forced", fake_teacher_forced)
    reference = metrics.locality_reference(None, Tokenizer(), requests)
    assert reference == [[[1, 1], [2, 2]], [[3, 3], [4, 4]]]
    assert [s["locality"] for s in metrics.counterfact_scores(None, Tokenizer(), requests, reference=reference)] == [1.0, 1.0]
    argmax["N4"] = [4, 9]  # the edit moved one of N4's two tokens
    assert [s["locality"] for s in metrics.counterfact_scores(None, Tokenizer(), requests, reference=reference)] == [1.0, 0.75]
    with pytest.raises(ValueError, match="neighbours"):
        metrics.counterfact_scores(None, Tokenizer(), requests, reference=[reference[0], reference[1][:1]])


def test_fluency_prompts_are_spread_over_the_requests():
    from types import SimpleNamespace

    from cl_runner.evaluation.fluency import fluency_prompts

    task = SimpleNamespace(type="edit", requests=[SimpleNamespace(generation_prompts=(f"p{i}", "x")) for i in range(10)])
    assert fluency_prompts([task], 4) == ["p0", "p2", "p5", "p7"]
    assert fluency_prompts([task], 20) == [f"p{i}" for i in range(10)]
    assert fluency_prompts([SimpleNamespace(type="qa", requests=[])], 4) == []


def test_fluency_generates_in_eval_mode_and_restores_the_mode(tiny_model_and_tokenizer):
    """A row after a trained task must generate as row 0 does: no dropout."""
    from contextlib import nullcontext

    from cl_runner.evaluation.fluency import generation_fluency
    from cl_runner.formatting import PromptFormatter

    model, tokenizer = tiny_model_and_tokenizer
    modes = []
    handle = model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    model.train()
    try:
        value = generation_fluency(model, PromptFormatter(tokenizer, False, None, 64), ["The capital of France is"], 4, 4, "cpu", [nullcontext])
    finally:
        handle.remove()
    assert value is not None and modes and not any(modes)
    assert model.training
