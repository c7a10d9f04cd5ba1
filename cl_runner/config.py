"""Composing cl-runner's Hydra config outside the CLI (tests, scripts, notebooks)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# An absolute path: console scripts give Hydra no calling file to resolve a relative one from.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# Settings that may change between a run and its resume without changing its results. The
# run directory's name ignores them too (conf/hydra/default.yaml, checked by a test).
RESUME_SAFE_KEYS = (
    "logger", "trainer.device", "trainer.num_threads", "trainer.progress_bar", "trainer.log_every",
    "eval.progress_bar", "model.loader.cache_dir",
)

# Run directories are named after the command-line overrides; a plain `cl-runner` gets "default".
if not OmegaConf.has_resolver("or_default"):
    OmegaConf.register_new_resolver("or_default", lambda value, default: value if value else default)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `cl-runner <overrides>` would run with (without Hydra's own `hydra:` node)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides or []))


def is_resume_safe(key: str) -> bool:
    return any(key == safe or key.startswith(safe + ".") for safe in RESUME_SAFE_KEYS)
