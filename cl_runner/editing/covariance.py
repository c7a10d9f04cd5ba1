"""Second-moment statistics of an edited module's inputs: C = E[k k^T] over a text corpus.

ROME's update direction is C^-1 k*, MEMIT's and AlphaEdit's solves weigh the new keys against
C, so C stands for "every key this weight already serves". The originals estimate it from
100,000 Wikipedia texts (tens of hours for a 7B model, EasyEdit #319); for a 1536-wide key a
few tens of thousands of tokens already give a full-rank estimate, so the corpus and the token
count are settings (``method.covariance``), the estimate shows a progress bar, and the result
is cached per (model weights, module, corpus, token count):

- ``corpus: builtin`` (default, offline): 320 texts of 128 tokens sampled once from SmolLM2-135M
  and shipped (``cl_runner/editing/data/generated_corpus.jsonl``, made by
  ``scripts/make_edit_corpus.py``): plain English any model can read;
- ``corpus: generated``: texts sampled from the edited model itself (seeded; slow on a CPU);
- ``corpus: files`` with ``paths: [...]``: local text files, one text per non-empty line
  (``.jsonl``: the ``text`` field of each line);
- ``corpus: hub`` with ``dataset``, ``config``, ``split``, ``text_field``: a hub dataset, when reachable.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from tqdm.auto import tqdm

from cl_runner.atomic_io import write_file_atomic
from cl_runner.editing.activations import reading, right_padded
from cl_runner.errors import UserError

log = logging.getLogger(__name__)

BUILTIN_CORPUS = Path(__file__).parent / "data" / "generated_corpus.jsonl"
CORPORA = ("builtin", "generated", "files", "hub")
GENERATION_STARTS = ("The", "In", "A", "It", "When", "This", "He", "She", "We", "There", "According to", "Scientists",
                     "The history of", "Today", "One of the", "My", "After the", "Many people", "The city of", "Water")


@dataclass(frozen=True)
class CovarianceSettings:
    corpus: str = "builtin"  # builtin | generated | files | hub
    tokens: int = 32_000  # tokens (non-padding) the estimate averages over (the builtin corpus holds about 40k)
    text_tokens: int = 128  # tokens per text (generated texts' length; longer texts are cut)
    batch_size: int = 16
    paths: tuple[str, ...] = ()
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    seed: int = 0
    ridge: float = 0.0  # added to C's diagonal (relative to its mean diagonal) before it is inverted

    def corpus_files(self) -> tuple[str, ...]:
        return (str(BUILTIN_CORPUS),) if self.corpus == "builtin" else self.paths

    def describe(self) -> dict:
        """What identifies the corpus in the cache key (a file's content, not just its name)."""
        described = {"corpus": self.corpus, "tokens": self.tokens, "text_tokens": self.text_tokens, "seed": self.seed}
        if self.corpus in ("files", "builtin"):
            described["files"] = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in self.corpus_files()]
        if self.corpus == "hub":
            described.update(dataset=self.dataset, config=self.config, split=self.split, text_field=self.text_field)
        return described


def settings_from(block: dict | None) -> CovarianceSettings:
    block = dict(block or {})
    known = set(CovarianceSettings.__dataclass_fields__)
    unknown = sorted(set(block) - known)
    if unknown:
        raise UserError(f"method.covariance: unknown key(s) {unknown}; known: {sorted(known)}")
    if "paths" in block:
        block["paths"] = tuple(block["paths"] or ())
    settings = CovarianceSettings(**block)
    if settings.corpus not in CORPORA:
        raise UserError(f"method.covariance.corpus must be one of {', '.join(CORPORA)}, got {settings.corpus!r}")
    if not isinstance(settings.tokens, int) or settings.tokens < 1:
        raise UserError(f"method.covariance.tokens must be a positive integer, got {settings.tokens!r}")
    if settings.corpus == "files":
        missing = [p for p in settings.paths if not Path(p).is_file()]
        if not settings.paths or missing:
            raise UserError(f"method.covariance.corpus=files needs existing method.covariance.paths; not found: {missing or 'none given'}")
    if settings.corpus == "hub" and not settings.dataset:
        raise UserError("method.covariance.corpus=hub needs method.covariance.dataset")
    return settings


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights: every parameter's name, shape and a strided sample of its values."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        flat = parameter.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(parameter.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def generated_texts(model, tokenizer, settings: CovarianceSettings) -> Iterable[list[int]]:
    """Token sequences sampled from the model (nucleus sampling, seeded), batch after batch, for ever."""
    device = next(model.parameters()).device
    generator_seed = settings.seed
    batch = 0
    while True:
        starts = [GENERATION_STARTS[(batch * settings.batch_size + i) % len(GENERATION_STARTS)] for i in range(settings.batch_size)]
        encoded = [tokenizer(s)["input_ids"] for s in starts]
        width = max(len(e) for e in encoded)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)  # left-padded for generation
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
        # generate() samples from the global generator: fork it, so estimating C leaves the run's
        # random stream where it was (a resumed run reads C from the cache and never draws here).
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(generator_seed * 100_003 + batch)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_p=0.95, top_k=0, max_new_tokens=settings.text_tokens - 1,
                                 min_new_tokens=settings.text_tokens - 1, pad_token_id=pad)
        for row, e in enumerate(encoded):
            yield out[row, width - len(e) :].tolist()
        batch += 1


def file_texts(tokenizer, settings: CovarianceSettings) -> Iterable[list[int]]:
    for path in settings.corpus_files():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            text = json.loads(line).get("text", "") if path.endswith(".jsonl") and line.strip() else line
            if text.strip():
                yield tokenizer(text)["input_ids"][: settings.text_tokens]


def hub_texts(tokenizer, settings: CovarianceSettings) -> Iterable[list[int]]:
    try:
        import datasets

        rows = datasets.load_dataset(settings.dataset, settings.config, split=settings.split, streaming=True)
        for row in rows.shuffle(seed=settings.seed, buffer_size=10_000):
            text = row.get(settings.text_field) or ""
            if text.strip():
                yield tokenizer(text)["input_ids"][: settings.text_tokens]
    except UserError:
        raise
    except Exception as error:  # an unreachable hub, a missing dataset: one line, the cause kept
        raise UserError(f"method.covariance: could not read hub dataset {settings.dataset!r}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from error


def corpus_texts(model, tokenizer, settings: CovarianceSettings) -> Iterable[list[int]]:
    if settings.corpus == "generated":
        return generated_texts(model, tokenizer, settings)
    if settings.corpus in ("files", "builtin"):
        return file_texts(tokenizer, settings)
    return hub_texts(tokenizer, settings)


@torch.no_grad()
def estimate_second_moment(model, module: torch.nn.Module, sequences: Iterable[list[int]], pad_id: int, tokens: int, batch_size: int,
                           description: str = "covariance") -> tuple[torch.Tensor, int]:
    """E[k k^T] (float64 sums, float32 result) of ``module``'s inputs over the non-padding tokens, until ``tokens`` are seen."""
    device = next(model.parameters()).device
    total, count = None, 0
    progress = tqdm(total=tokens, desc=description, unit="tok", leave=False)
    batch: list[list[int]] = []

    def consume(batch):
        nonlocal total, count
        ids, mask = right_padded(batch, pad_id, device)
        with reading(module) as seen:
            model(input_ids=ids, attention_mask=mask)
        keys = seen["input"][mask.bool()].double()
        keys = keys[: tokens - count]
        total = keys.T @ keys if total is None else total + keys.T @ keys
        count += len(keys)
        progress.update(len(keys))

    try:
        for sequence in sequences:
            if not sequence:
                continue
            batch.append(sequence)
            if len(batch) == batch_size:
                consume(batch)
                batch = []
                if count >= tokens:
                    break
        if batch and count < tokens:
            consume(batch)
    finally:
        progress.close()
    if not count:
        raise UserError("method.covariance: the corpus gave no tokens")
    if count < tokens:
        log.warning("covariance corpus ran out after %d of %d tokens; estimating from those", count, tokens)
    return (total / count).float(), count


def second_moment(model, tokenizer, module: torch.nn.Module, module_name: str, settings: CovarianceSettings, cache_dir: Path,
                  fingerprint: str | None = None) -> torch.Tensor:
    """C for ``module``: from the cache when this (model, module, corpus, count) was estimated before.

    ``fingerprint`` names the model's weights in the cache key (default: the weights now). A
    resumed editor passes the fingerprint of the weights it first estimated C on, since its
    own edits have changed them since.
    """
    fingerprint = fingerprint or model_fingerprint(model)
    key_material = json.dumps({"model": fingerprint, "module": module_name, "corpus": settings.describe()}, sort_keys=True)
    key = hashlib.sha256(key_material.encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"{module_name.replace('.', '_')}-{key}.safetensors"
    if path.exists():
        log.info("covariance of %s from cache %s", module_name, path)
        return safetensors.torch.load_file(str(path))["second_moment"]
    if fingerprint != model_fingerprint(model):
        log.warning("covariance of %s: the cache for the weights this run started editing is gone (%s); estimating it on the edited weights", module_name, path)
    log.info("estimating the covariance of %s's inputs over %d tokens (%s corpus; cached at %s)", module_name, settings.tokens, settings.corpus, path)
    was_training = model.training
    model.eval()
    try:
        moment, count = estimate_second_moment(model, module, corpus_texts(model, tokenizer, settings), tokenizer.pad_token_id, settings.tokens,
                                               settings.batch_size, f"covariance {module_name}")
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"module": module_name, "tokens": str(count), "corpus": json.dumps(settings.describe())}
    write_file_atomic(path, lambda tmp: safetensors.torch.save_file({"second_moment": moment.contiguous()}, str(tmp), metadata=metadata))
    return moment
