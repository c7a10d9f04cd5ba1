"""The training loss and the choice scorer are exact for every model and PEFT method.

Each test here pins a property that an earlier shortcut broke: calling the decoder and head
directly (skips virtual tokens, soft-capping, router losses), scoring choices without their
end-of-turn token, cutting prompts from the left, weighting micro-batches instead of tokens.
"""

import copy

import pytest
import torch
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

from cl_runner.evaluation.loglikelihood import choice_loglikelihoods, choice_metrics
from cl_runner.formatting import IGNORE_INDEX, PromptFormatter, TokenizedExample
from cl_runner.methods.base import ContinualMethod
from cl_runner.tasks import Example
from cl_runner.training import answer_token_loss, collate, step_token_weights, training_batch, weighted_objective

PEFT_CONFIGS = {
    "lora": lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    "prompt_tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prefix_tuning": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "p_tuning": lambda: PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16),
    "ia3": lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def perturb_adapters(model) -> None:
    """Adapters start as the identity (LoRA B = 0, IA3 = 1): make them matter so a skipped adapter shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)


def sharpened(model):
    """The tiny random model predicts a near-uniform distribution; larger logits make every difference visible."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30)  # tied with the input embeddings, which the first norm rescales
    return model


def wrapped(base, method: str):
    model = get_peft_model(sharpened(base), PEFT_CONFIGS[method]())
    perturb_adapters(model)
    return model


def text_batch(tokenizer, formatter=None):
    formatter = formatter or PromptFormatter(tokenizer)
    examples = [formatter.encode_example(Example(f"Say {w} please, now", w)) for w in ("red", "blue sky", "a green tree by the road")]
    return examples, collate(examples, tokenizer.pad_token_id)


def random_batch(vocab: int, lengths=(9, 6, 12), answers=(2, 3, 5), seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for n, a in zip(lengths, answers):
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        examples.append(TokenizedExample(ids, [IGNORE_INDEX] * (n - a) + ids[n - a :]))
    return examples, collate(examples, 0)


def tiny_gemma2():
    """A random 2-layer Gemma 2: logit soft-capping after the head, eager attention with its own soft-capping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16, final_logit_softcapping=0.7, attn_logit_softcapping=50.0, sliding_window=64, pad_token_id=0)
    torch.manual_seed(0)
    return sharpened(Gemma2ForCausalLM(config).eval())


def tiny_mixtral():
    """A random 2-layer Mixtral that returns its router's load-balancing loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                           num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5, pad_token_id=0)
    torch.manual_seed(0)
    return MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["none", *PEFT_CONFIGS])
def test_loss_equals_the_models_own_loss_through_peft_wrappers(tiny_model_and_tokenizer, method):
    base, tokenizer = tiny_model_and_tokenizer
    model = sharpened(base) if method == "none" else wrapped(base, method)
    _, batch = text_batch(tokenizer)
    ours = answer_token_loss(model, batch)
    reference = float(model(**batch).loss)
    assert float(ours.loss) == pytest.approx(reference, abs=2e-5)
    assert ours.last_hidden_state.shape[:2] == batch["input_ids"].shape
    if method != "none":
        with model.disable_adapter():  # the adapter must change the loss, or the comparison shows nothing
            assert abs(float(answer_token_loss(model, batch).loss) - reference) > 1e-3


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_gradients_reach_virtual_token_parameters(tiny_model_and_tokenizer, method):
    model = wrapped(tiny_model_and_tokenizer[0], method)
    _, batch = text_batch(tiny_model_and_tokenizer[1])
    answer_token_loss(model, batch).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in trainable), [n for n, _ in trainable]


def test_loss_keeps_gemma2_logit_soft_capping():
    model = tiny_gemma2()
    _, batch = random_batch(96)
    reference = float(model(**batch).loss)
    assert float(answer_token_loss(model, batch).loss) == pytest.approx(reference, abs=2e-5)
    model.config.final_logit_softcapping = None  # capping must matter here, or the test shows nothing
    assert abs(float(answer_token_loss(model, batch).loss) - reference) > 1e-2


def test_loss_includes_the_moe_router_loss():
    model = tiny_mixtral()
    _, batch = random_batch(96)
    ours = answer_token_loss(model, batch)
    assert ours.aux_loss is not None and float(ours.aux_loss) > 0.1
    assert float(ours.loss) == pytest.approx(float(model(**batch).loss), rel=1e-5)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "p_tuning", "prefix_tuning"])
@pytest.mark.parametrize("layout", ["shared_prefix", "packed", "prefix_tree"])
def test_packed_layouts_give_the_padded_loss_and_gradients(tiny_model_and_tokenizer, layout, method):
    """Virtual tokens (prompt, P- and prefix tuning) run once as a cache the packed rows continue: same loss, same gradients."""
    model = wrapped(tiny_model_and_tokenizer[0], method)
    examples, _ = text_batch(tiny_model_and_tokenizer[1])
    weights = [0.1, 0.2, 0.05]
    results = {}
    for kind in ("padded", layout):
        model.zero_grad()
        batch = training_batch(model, examples, weights, tiny_model_and_tokenizer[1].pad_token_id, kind, row_tokens=1024)
        loss = weighted_objective(answer_token_loss(model, batch), batch)
        loss.backward()
        results[kind] = (float(loss), [p.grad.clone() for p in model.parameters() if p.requires_grad], batch["input_ids"].numel())
    assert results[layout][0] == pytest.approx(results["padded"][0], rel=1e-5)
    for ours, reference in zip(results[layout][1], results["padded"][1]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    assert results[layout][2] < results["padded"][2]  # the point: fewer positions computed (shared_prefix: in the rows)


def test_eager_attention_with_several_padded_rows_gives_the_padded_loss():
    """Gemma 2 uses eager attention (additive float mask); a small row size forces several rows and padding."""
    model = tiny_gemma2()
    assert model.config._attn_implementation == "eager"
    examples, batch = random_batch(96, lengths=(9, 6, 12, 7), answers=(2, 3, 5, 1))
    examples = [TokenizedExample(examples[0].input_ids[:4] + e.input_ids[4:], examples[0].labels[:4] + e.labels[4:]) for e in examples]  # a shared start
    reference = float(answer_token_loss(model, collate(examples, 0)).loss)
    answer_tokens = sum(e.num_target_tokens for e in examples)
    for layout in ("packed", "prefix_tree"):
        tree = training_batch(model, examples, [1 / answer_tokens] * 4, 0, layout, row_tokens=14)
        assert tree["input_ids"].shape[0] >= 2 and tree["attention_mask"].dim() == 4
        assert float(weighted_objective(answer_token_loss(model, tree), tree)) == pytest.approx(reference, abs=2e-5)


def test_models_that_cannot_take_a_tree_are_trained_padded():
    """Router losses are counted over the whole row, and convolution layers see it all: both get padded rows."""
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from cl_runner.layout import _unsupported_by_config, supports_shared_prefix, supports_tree_layout

    torch.manual_seed(0)
    models = [
        tiny_mixtral(),
        Lfm2ForCausalLM(Lfm2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, layer_types=["conv", "full_attention"], pad_token_id=0)),
    ]
    examples, batch = random_batch(96)
    for model in models:
        assert _unsupported_by_config(model, 12)  # told by the config alone, before any probe runs
        assert not supports_tree_layout(model.eval(), 12) and not supports_shared_prefix(model, 12)
        for layout in ("auto", "prefix_tree"):
            laid = training_batch(model, examples, [1.0] * 3, 0, layout, row_tokens=1024)
            assert laid["attention_mask"].dim() == 2
            assert float(answer_token_loss(model, laid).loss) == pytest.approx(float(model(**batch).loss), abs=2e-5)


def test_a_model_that_leaks_across_a_row_fails_the_tree_check(tiny_model_and_tokenizer):
    """What no config tells (here a layer mixing every position of the row) is caught by comparing both layouts once."""
    from cl_runner.layout import supports_shared_prefix, supports_tree_layout

    model = copy.deepcopy(tiny_model_and_tokenizer[0]).eval()
    assert supports_tree_layout(model, 12) and supports_shared_prefix(model, 12)
    leaky = copy.deepcopy(model)
    leaky.model.layers[0].register_forward_pre_hook(lambda module, args: (args[0] + args[0].cumsum(dim=1), *args[1:]))
    assert not supports_tree_layout(leaky, 12) and not supports_shared_prefix(leaky, 12)


def test_auto_layout_picks_by_what_the_examples_share(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    formatter = PromptFormatter(tokenizer)

    def chosen(examples):
        batch = training_batch(model, examples, [1] * len(examples), tokenizer.pad_token_id, "auto", 4096)
        return "shared_prefix" if "prefix_ids" in batch else "tree" if batch["attention_mask"].dim() == 4 else "padded"

    same_prompt = [formatter.encode_example(Example("Reply with the second word of the list: cat dog owl", w)) for w in ("dog", "cat", "owl", "bee")]
    assert chosen(same_prompt) == "tree"  # short rows that share almost everything
    long_after_the_template = [formatter.encode_example(Example(" ".join(f"w{i}x{j}" for j in range(120)), "yes")) for i in range(8)]
    assert chosen(long_after_the_template) == "shared_prefix"  # only the template is shared; a tree row would be 8x as long
    nothing_shared = [TokenizedExample([i] + e.input_ids[1:], [IGNORE_INDEX] + e.labels[1:]) for i, e in enumerate(long_after_the_template, start=5)]
    assert chosen(nothing_shared) == "padded"


def test_prefix_tree_computes_shared_prompt_tokens_once(tiny_model_and_tokenizer):
    model, tokenizer = tiny_model_and_tokenizer
    formatter = PromptFormatter(tokenizer)
    examples = [formatter.encode_example(Example("Reply with the word after 'x'.", w)) for w in ("red", "blue", "green")]
    shared = len(examples[0].input_ids) - len(formatter.answer_ids("Reply with the word after 'x'.", "red"))
    tree = training_batch(model, examples, [1, 1, 1], tokenizer.pad_token_id, "prefix_tree", row_tokens=1024)
    assert tree["input_ids"].shape[0] == 1
    assert tree["input_ids"].shape[1] == shared + sum(len(e.input_ids) - shared for e in examples)


class TestAccumulation:
    """k micro-batches of b examples give the gradient of one batch of k*b, whatever their answer lengths."""

    @staticmethod
    def gradients(loop, model, mixed, replay_share=0.0):
        model.zero_grad()
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss = loop.accumulate(model, ContinualMethod(), mixed, replay_share, scaler)
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    @pytest.fixture
    def setup(self, tiny_model_and_tokenizer):
        from omegaconf import OmegaConf

        from cl_runner.training import TrainingLoop

        model = wrapped(tiny_model_and_tokenizer[0], "lora")
        formatter = PromptFormatter(tiny_model_and_tokenizer[1])
        # Answers of 1 to 8 words: micro-batches hold very different numbers of answer tokens.
        examples = [formatter.encode_example(Example(f"Count to {n}", " ".join(["one"] * n))) for n in (1, 8, 2, 1, 6, 1, 3, 1)]
        cfg = OmegaConf.create({"precision": "fp32", "batch_layout": "padded", "row_tokens": 1024})
        return TrainingLoop(cfg, torch.device("cpu"), tiny_model_and_tokenizer[1].pad_token_id), model, examples

    def test_micro_batches_add_up_to_one_big_batch(self, setup):
        loop, model, examples = setup
        big_loss, big = self.gradients(loop, model, [(examples, [])])
        for k in (2, 4):
            size = len(examples) // k
            loss, grads = self.gradients(loop, model, [(examples[i : i + size], []) for i in range(0, len(examples), size)])
            assert loss == pytest.approx(big_loss, rel=1e-5)  # the logged loss is the step's, not its last micro-batch's
            for ours, reference in zip(grads, big):
                torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        reference = answer_token_loss(model, collate(examples, loop.pad_token_id)).loss
        assert big_loss == pytest.approx(float(reference), rel=1e-5)

    def test_replay_carries_exactly_its_ratio_of_the_loss(self, setup):
        loop, model, examples = setup
        current, replayed = examples[:6], examples[6:]
        task_weight, replay_weight = step_token_weights([(current[:3], replayed[:1]), (current[3:], replayed[1:])], 0.2)
        assert task_weight * sum(e.num_target_tokens for e in current) == pytest.approx(0.8)
        assert replay_weight * sum(e.num_target_tokens for e in replayed) == pytest.approx(0.2)
        # The step's loss is then 0.8 x the task's mean token loss + 0.2 x the replayed one.
        loss, _ = self.gradients(loop, model, [(current[:3], replayed[:1]), (current[3:], replayed[1:])], replay_share=0.2)
        task_mean = float(answer_token_loss(model, collate(current, loop.pad_token_id)).loss)
        replay_mean = float(answer_token_loss(model, collate(replayed, loop.pad_token_id)).loss)
        assert loss == pytest.approx(0.8 * task_mean + 0.2 * replay_mean, rel=1e-5)


def test_bf16_full_fine_tuning_keeps_fp32_master_weights(tiny_model_and_tokenizer):
    """Updates smaller than half a bf16 step must accumulate, not round away."""
    from omegaconf import OmegaConf

    from cl_runner.replay import NoReplay
    from cl_runner.training import TrainingLoop

    model = copy.deepcopy(tiny_model_and_tokenizer[0]).to(torch.bfloat16)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    assert all(bool((v == 1).all()) for v in norms.values())  # spacing of bf16 just below 1.0: 2^-8
    formatter = PromptFormatter(tiny_model_and_tokenizer[1])
    examples = [formatter.encode_example(Example(f"Say {w}", w)) for w in ("red", "blue", "green", "gold")] * 6
    cfg = OmegaConf.create({"batch_size": 4, "grad_accum_steps": 1, "epochs": 4, "max_steps": None, "lr": 1e-3, "warmup_ratio": 0.0, "weight_decay": 0.0,
                            "max_grad_norm": None, "precision": "bf16", "group_by_length": True, "log_every": 1, "progress_bar": False})
    # Each Adam step moves a weight by about lr = 1e-3, under half the spacing (2^-9 ~ 2e-3): without
    # an fp32 copy every update rounds back to 1.0.
    TrainingLoop(cfg, torch.device("cpu"), tiny_model_and_tokenizer[1].pad_token_id).train(model, model.parameters(), examples, ContinualMethod(), NoReplay(), seed=0)
    changed = [n for n, p in model.named_parameters() if n in norms and not torch.equal(p, norms[n])]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert len(changed) >= len(norms) // 2, changed


def test_fp16_weights_train_with_a_grad_scaler(tiny_model_and_tokenizer):
    from omegaconf import OmegaConf

    from cl_runner.replay import NoReplay
    from cl_runner.training import TrainingLoop

    model = copy.deepcopy(tiny_model_and_tokenizer[0]).to(torch.float16)
    before = [p.detach().clone() for p in model.parameters()]
    formatter = PromptFormatter(tiny_model_and_tokenizer[1])
    examples = [formatter.encode_example(Example(f"Say {w}", w)) for w in ("red", "blue", "green", "gold")] * 4
    cfg = OmegaConf.create({"batch_size": 4, "grad_accum_steps": 1, "epochs": 2, "max_steps": None, "lr": 1e-2, "warmup_ratio": 0.0, "weight_decay": 0.0,
                            "max_grad_norm": 1.0, "precision": "fp16", "group_by_length": True, "log_every": 1, "progress_bar": False})
    records = []
    loop = TrainingLoop(cfg, torch.device("cpu"), tiny_model_and_tokenizer[1].pad_token_id, on_step=records.append)
    loop.train(model, model.parameters(), examples, ContinualMethod(), NoReplay(), seed=0)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(r["loss_scale"] > 1 for r in records)  # the grad scaler ran
    assert records[-1]["loss"] < records[0]["loss"]
    assert all(p.dtype == torch.float16 and bool(torch.isfinite(p).all()) for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


# --- choice scoring ---------------------------------------------------------------------------

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONTINENTS = ("North", "North America", "South America", "Europe", "Asia")


@pytest.fixture(scope="module")
def llama3_style(tiny_model_and_tokenizer):
    """The tiny model with a Llama-3-style (non-ChatML) template and its special tokens."""
    model, tokenizer = copy.deepcopy(tiny_model_and_tokenizer[0]), copy.deepcopy(tiny_model_and_tokenizer[1])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    model.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(1)
    with torch.no_grad():
        model.get_input_embeddings().weight[-3:].normal_(0, 0.02)
    return model.eval(), tokenizer


def hand_scored(model, sequences_and_starts):
    """Log-likelihood of each sequence's tokens from ``start`` on, from the model's full logits."""
    scores = []
    for seq, start in sequences_and_starts:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0]
        logits = logits[logits.shape[0] - len(seq) :].log_softmax(-1)  # drop virtual tokens, if any
        scores.append(sum(float(logits[i - 1, seq[i]]) for i in range(start, len(seq))))
    return scores


def test_choices_are_scored_on_exactly_the_training_targets(llama3_style):
    model, tokenizer = llama3_style
    formatter = PromptFormatter(tokenizer)
    north, north_america = formatter.continuation_ids("North"), formatter.continuation_ids("North America")
    assert north_america[: len(north)] == north  # one choice is a token prefix of another
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for country in ("Canada", "Peru"):
        example = Example(f"Which continent is {country} in?", "North America", CONTINENTS)
        request = formatter.encode_choices(example)
        for choice, tokens in zip(CONTINENTS, request.choices):
            trained = formatter.encode_example(Example(example.prompt, choice, CONTINENTS)).input_ids
            assert request.prompt + tokens == trained  # the scored sequence is the one training teaches
            assert eot in tokens  # "North" is scored as a whole answer, not as the start of "North America"


@pytest.mark.parametrize("layout", ["prefix_tree", "padded", "auto"])  # auto: the cheapest layout, here a shared prefix or the tree
def test_choice_loglikelihoods_equal_hand_computed_ones(llama3_style, layout):
    model, tokenizer = llama3_style
    formatter = PromptFormatter(tokenizer)
    examples = [Example(f"Which continent is {c} in?", "Asia", CONTINENTS) for c in ("Japan", "the country with the longest name here", "Chile")]
    requests = [formatter.encode_choices(e) for e in examples]
    ours = choice_loglikelihoods(model, requests, tokenizer.pad_token_id, batch_size=2, device="cpu", layout=layout)
    for request, scores in zip(requests, ours):
        expected = hand_scored(model, [(request.prompt + c, len(request.prompt)) for c in request.choices])
        assert scores == pytest.approx(expected, abs=1e-4)


def test_choices_scored_after_a_shared_prefix_equal_hand_computed_ones(llama3_style):
    from cl_runner.forward import forward_selected
    from cl_runner.layout import shared_prefix_layout

    model, tokenizer = llama3_style
    formatter = PromptFormatter(tokenizer)
    requests = [formatter.encode_choices(Example(f"Which continent is {c} in?", "Asia", CONTINENTS)) for c in ("Japan", "Chile")]
    sequences = [r.prompt + c for r in requests for c in r.choices]
    laid = shared_prefix_layout(sequences, [range(len(r.prompt), len(r.prompt) + len(c)) for r in requests for c in r.choices], 0)
    assert laid is not None and laid.model_inputs["prefix_ids"].shape[1] > 5
    with torch.no_grad():
        logits = forward_selected(model, laid.input_ids, laid.read_rows, laid.read_cols, **laid.model_inputs).logits
    token_logprobs = logits.log_softmax(-1).gather(1, laid.targets[:, None])[:, 0]
    ours = torch.zeros(len(sequences)).index_add_(0, laid.owners, token_logprobs).tolist()
    expected = hand_scored(model, [(r.prompt + c, len(r.prompt)) for r in requests for c in r.choices])
    assert ours == pytest.approx(expected, abs=1e-4)


def test_a_shared_prefix_never_holds_a_read_position():
    from cl_runner.layout import shared_prefix_layout

    assert shared_prefix_layout([[1, 2, 3], [1, 2, 3]], [[1, 2], [1, 2]], 0) is None  # identical, read from the first token on
    one = shared_prefix_layout([[1, 2, 3, 4]], [[3]], 0)
    assert one.model_inputs["prefix_ids"].tolist() == [[1, 2]] and one.read_cols.tolist() == [0]
    cases = [([[1, 2, 3, 4, 5], [1, 2, 3]], [[4], [2]]), ([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]], [[4], [4]]), ([[7, 8, 9, 10], [7, 8, 9]], [[], [2]])]
    for sequences, targets in cases:
        laid = shared_prefix_layout(sequences, targets, 0)
        prefix = laid.model_inputs["prefix_ids"].shape[1]
        assert prefix <= min(i for t in targets for i in t) - 1 and bool((laid.read_cols >= 0).all())
        assert laid.model_inputs["position_ids"][0, 0] == prefix
        assert laid.targets.tolist() == [sequences[s][i] for s, t in enumerate(targets) for i in t]


def test_prompt_tuned_models_are_scored_through_their_virtual_tokens(tiny_model_and_tokenizer):
    model = wrapped(tiny_model_and_tokenizer[0], "prompt_tuning").eval()
    formatter = PromptFormatter(tiny_model_and_tokenizer[1])
    requests = [formatter.encode_choices(Example(f"Pick one {i}", "red", ("red", "dark blue"))) for i in range(3)]
    ours = choice_loglikelihoods(model, requests, formatter.tokenizer.pad_token_id, batch_size=4, device="cpu")
    for request, scores in zip(requests, ours):
        assert scores == pytest.approx(hand_scored(model, [(request.prompt + c, len(request.prompt)) for c in request.choices]), abs=1e-4)
    with model.disable_adapter():
        plain = choice_loglikelihoods(model, requests, formatter.tokenizer.pad_token_id, batch_size=4, device="cpu")
    assert max(abs(a - b) for p, o in zip(plain, ours) for a, b in zip(p, o)) > 1e-2


def test_acc_and_acc_norm_against_hand_computed_rankings():
    choices = [("a", "bbbb"), ("a", "bbbb"), ("cc", "d")]
    targets = ["bbbb", "a", "cc"]
    # Item 1: acc picks "a" (-2 > -4); per character "bbbb" wins (-1 > -2). Item 3: a tie goes to the first choice.
    scores = [[-2.0, -4.0], [-2.0, -4.0], [-2.0, -1.0]]
    assert choice_metrics(choices, targets, scores) == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}


# --- truncation -------------------------------------------------------------------------------


def test_overlong_prompts_lose_their_middle_not_their_frame(tiny_model_and_tokenizer):
    tokenizer = tiny_model_and_tokenizer[1]
    formatter = PromptFormatter(tokenizer, max_length=80)
    text = "START " + " ".join(f"word{i}" for i in range(80)) + " END"
    full = formatter._render_prompt(text)
    assert len(full) > 2 * 80
    frame = formatter._render_prompt("")
    header = next(i for i, (a, b) in enumerate(zip(frame, full)) if a != b)
    footer = next(i for i, (a, b) in enumerate(zip(reversed(frame), reversed(full))) if a != b)
    example = Example(text, "yes", ("yes", "no"))
    encoded = formatter.encode_example(example)
    prompt = encoded.input_ids[: len(encoded.input_ids) - len(formatter.answer_ids(text, "yes"))]
    assert len(encoded.input_ids) <= 80
    assert prompt[: header + 1] == full[: header + 1]  # BOS, system prompt, user header, first token
    assert prompt[-(footer + 1) :] == full[-(footer + 1) :]  # last token, end of turn, assistant header
    decoded = tokenizer.decode(prompt)
    assert "START" in decoded and "END" in decoded and "word40" not in decoded
    assert formatter.encode_choices(example).prompt == prompt  # the same budget in evaluation
