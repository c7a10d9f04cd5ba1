"""Composing cl-runner's Hydra config outside the CLI (tests, scripts, notebooks)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cl_runner.errors import UserError, find_user_error

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


def build(node: DictConfig, group: str):
    """Instantiate a config group's ``_target_`` (its ``name`` key labels runs and is not an argument).

    Hydra wraps whatever the target raises in an InstantiationException; a UserError comes
    back out as itself, and any other failure to construct (an unknown or mistyped setting)
    becomes a UserError naming the group, so the CLI prints one line for it.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate({k: v for k, v in node.items() if k != "name"})
    except InstantiationException as exc:
        user = find_user_error(exc)
        if user is not None:
            raise user from exc
        cause = exc.__cause__ or exc
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{group}: bad settings for {node.get('_target_')} ({reason})") from exc
