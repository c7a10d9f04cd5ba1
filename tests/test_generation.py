"""Greedy generation: batched with left padding, stopped at EOS ids, end-of-turn and ``until`` strings."""

import copy

import pytest
import torch

from cl_runner.evaluation.generation import cut_at_stop_strings, generate, stop_token_ids, until_stop_token
from cl_runner.formatting import PromptFormatter
from cl_runner.tasks import Example


class ForcedTokens:
    """Makes the model's greedy choice ``token_for(step)``, counting forward passes."""

    def __init__(self, model, token_for):
        self.calls = 0
        self.token_for = token_for
        self.handle = model.get_output_embeddings().register_forward_hook(self.force)

    def force(self, module, args, output):
        forced = torch.full_like(output, -1e4)
        forced[..., self.token_for(self.calls)] = 1e4
        self.calls += 1
        return forced


@pytest.fixture
def model_and_formatter(tiny_model_and_tokenizer):
    model = copy.deepcopy(tiny_model_and_tokenizer[0]).eval()
    return model, PromptFormatter(tiny_model_and_tokenizer[1])


def examples(*prompts):
    return [Example(p, "") for p in prompts]


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(model_and_formatter):
    from transformers import LlamaForCausalLM

    config, formatter = copy.deepcopy(model_and_formatter[0].config), model_and_formatter[1]
    config.initializer_range = 0.3  # larger random weights: the greedy output depends on the prompt
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    prompts = examples("Hi", "Tell me a long story about a cat and a dog and a bird", "Why?")
    batched = generate(model, formatter, prompts, max_new_tokens=6, batch_size=3, device="cpu")
    assert batched == [generate(model, formatter, [p], max_new_tokens=6, batch_size=1, device="cpu")[0] for p in prompts]
    assert len(set(batched)) == 3 and all(batched)  # distinct, non-empty: padding mistakes would show


def test_stop_ids_cover_the_end_of_turn_token_and_every_configured_eos(model_and_formatter):
    model, formatter = model_and_formatter
    im_end = formatter.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = [im_end, 17]
    assert {im_end, 17} <= set(stop_token_ids(model, formatter))


def test_generation_stops_at_an_eos_id_from_the_models_list(model_and_formatter):
    model, formatter = model_and_formatter
    word = formatter.tokenizer.encode("cat", add_special_tokens=False)[0]
    model.generation_config.eos_token_id = [formatter.tokenizer.eos_token_id, 17]  # 17: an extra EOS id, as Llama 3 lists several
    forced = ForcedTokens(model, lambda step: word if step < 3 else 17)
    out = generate(model, formatter, examples("Say cat"), max_new_tokens=10, batch_size=1, device="cpu")
    assert out == ["catcatcat"]
    assert forced.calls == 4  # stopped at the 4th token instead of running all 10


def test_generation_stops_at_until_strings_and_drops_them(model_and_formatter):
    model, formatter = model_and_formatter
    tokens = [formatter.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("dog", "\n", "cat")]
    forced = ForcedTokens(model, lambda step: tokens[min(step, 2)])
    out = generate(model, formatter, examples("Say dog"), max_new_tokens=10, batch_size=1, device="cpu", until=["\n"])
    assert out == ["dog"]
    assert forced.calls <= 3


def test_cut_at_the_earliest_stop_string():
    assert cut_at_stop_strings("a. b\nc", ["\n", "."]) == "a"
    assert cut_at_stop_strings("abc", []) == "abc"


def test_prefix_tuning_generates_with_its_prefix(tiny_model_and_tokenizer):
    """transformers' generate() drops a PEFT prefix (it passes its own cache too): the answer must still follow the prefix."""
    from peft import PrefixTuningConfig, get_peft_model

    model, tokenizer = tiny_model_and_tokenizer
    tuned = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tuned.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 3)
    formatter = PromptFormatter(tokenizer, True, None, 128)
    example = Example("Name a colour.", "red")
    prompt = torch.tensor([formatter.encode_prompt(example, reserve=4)])
    with torch.no_grad():
        first_with_prefix = int(tuned(input_ids=prompt).logits[0, -1].argmax())
        with tuned.disable_adapter():
            first_without = int(tuned(input_ids=prompt).logits[0, -1].argmax())
    assert first_with_prefix != first_without  # the prefix matters for this prompt
    from cl_runner.evaluation.generation import _greedy_without_generate, stop_token_ids

    [answer] = generate(tuned, formatter, [example], max_new_tokens=4, batch_size=1, device="cpu")  # decoded after the prefix as a cache
    expected = _greedy_without_generate(tuned, prompt[0].tolist(), 4, stop_token_ids(tuned, formatter), "cpu")
    assert expected[0] == first_with_prefix and answer == tokenizer.decode(expected, skip_special_tokens=True).strip()
    with tuned.disable_adapter():
        [untuned] = generate(tuned, formatter, [example], max_new_tokens=4, batch_size=1, device="cpu")
    assert answer != untuned


VIRTUAL_TOKEN_CONFIGS = {
    "prefix_tuning": lambda peft: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "prompt_tuning": lambda peft: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    "p_tuning": lambda peft: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=16),
}


def sharp_random_llama(virtual_tokens: str | None = None):
    """A random 2-layer LLaMA (seeded), with PEFT virtual tokens if named. A random model is
    near-uniform: sharp logits let every input change the argmax."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=False, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    if virtual_tokens is None:
        return model
    tuned = peft.get_peft_model(model, VIRTUAL_TOKEN_CONFIGS[virtual_tokens](peft)).eval()
    with torch.no_grad():
        for p in tuned.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape) * 2)
    return tuned


@pytest.mark.parametrize("method", list(VIRTUAL_TOKEN_CONFIGS))
def test_cached_decoding_after_virtual_tokens_equals_full_forward_passes(method):
    """Prompt, P- and prefix tuning decode in left-padded batches with a KV cache after their virtual tokens,
    token for token as greedy decoding through PEFT's own forward (full passes, one prompt at a time)."""
    from cl_runner.evaluation.generation import _greedy_without_generate, _left_padded, greedy_cached

    tuned = sharp_random_llama(method)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (4, 9, 7)]
    stops = [5, 7]
    ids, mask = _left_padded(prompts, 0)
    with torch.no_grad():
        batched = greedy_cached(tuned, ids, mask, [8] * len(prompts), stops)
        expected = [_greedy_without_generate(tuned, p, 8, stops, "cpu") for p in prompts]
        with tuned.disable_adapter():
            untuned = [_greedy_without_generate(tuned, p, 8, stops, "cpu") for p in prompts]
    ours = [until_stop_token(row, stops) for row in batched]
    assert ours == expected
    assert expected != untuned  # the virtual tokens change the answers, so dropping them would show


def test_rows_with_different_budgets_decode_in_one_batch_as_they_would_alone():
    """greedy_cached: each row stops at its own budget or stop token, token for token as full forward passes."""
    from cl_runner.evaluation.generation import _greedy_without_generate, _left_padded, greedy_cached

    model = sharp_random_llama()
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (4, 9, 7, 5)]
    budgets, stops = [2, 9, 5, 0], [5, 7]
    ids, mask = _left_padded(prompts, 0)
    with torch.no_grad():
        batched = greedy_cached(model, ids, mask, budgets, stops)
        expected = [_greedy_without_generate(model, p, n, stops, "cpu") for p, n in zip(prompts, budgets)]
    assert all(len(row) <= n for row, n in zip(batched, budgets))
    ours = [until_stop_token(row, stops) for row in batched]
    assert ours == expected and len({len(e) for e in expected}) > 2  # the rows really ended at different points


def test_generate_reads_answers_decoded_ahead(monkeypatch):
    """Inside use_decoded, generate() answers from the shared decoding (no model call) with what it would have decoded."""
    from cl_runner.config import compose_config
    from cl_runner.evaluation.generation import decode_ahead, use_decoded
    from cl_runner.models import load_model

    model, tokenizer = load_model(compose_config([]).model)  # SmolLM2: real answers of different lengths
    formatter = PromptFormatter(tokenizer, True, None, 256)
    short = [Example("What is the capital of France?", ""), Example("Name a colour.", "")]
    long = [Example("List three fruits, one per line.", "")]
    alone = generate(model, formatter, short, 4, 8, "cpu"), generate(model, formatter, long, 12, 8, "cpu", until=["\n\n"])
    replies = decode_ahead(model, formatter, [(e, 4) for e in short] + [(e, 12) for e in long], 8, "cpu")
    assert len(replies) == 3 and all(alone[0]) and "\n" in alone[1][0]  # real text, the long one over several lines
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("decoded again"))
    with use_decoded(replies):
        together = generate(model, formatter, short, 4, 8, "cpu"), generate(model, formatter, long, 12, 8, "cpu", until=["\n\n"])
        with pytest.raises(pytest.fail.Exception):  # another length is not among the answers: the model decodes it
            generate(model, formatter, short, 5, 8, "cpu")
    assert together == alone
    with pytest.raises(pytest.fail.Exception):  # outside the block the model decodes again
        generate(model, formatter, short, 4, 8, "cpu")


@pytest.mark.parametrize("method", ["none", "prompt_tuning"])
def test_a_shared_prompt_start_runs_once_and_decoding_is_unchanged(method):
    """greedy_cached with the prompts' common start as ``prefix`` gives the tokens of decoding the whole prompts."""
    from cl_runner.evaluation.generation import _common_prefix, _greedy_without_generate, _left_padded, greedy_cached

    model = sharp_random_llama(None if method == "none" else method)
    start = torch.randint(3, 96, (6,)).tolist()
    prompts = [start + torch.randint(3, 96, (n,)).tolist() for n in (1, 4, 3)]
    shared = _common_prefix(prompts)
    assert shared == 6
    ids, mask = _left_padded([p[shared:] for p in prompts], 0)
    with torch.no_grad():
        batched = greedy_cached(model, ids, mask, [7, 7, 7], [5], prefix=prompts[0][:shared])
        expected = [_greedy_without_generate(model, p, 7, [5], "cpu") for p in prompts]
    assert [until_stop_token(row, [5]) for row in batched] == expected
