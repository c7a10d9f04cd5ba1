"""Composing cl-runner's Hydra config outside the CLI (tests, scripts, notebooks)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cl_runner.errors import UserError, find_user_error

# An absolute path: console scripts give Hydra no calling file to resolve a relative one from.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# Settings that may change between a run and its resume without changing its results. The
# run directory's name ignores them too (conf/hydra/default.yaml, checked by a test).
RESUME_SAFE_KEYS = (
    "logger", "trainer.device", "trainer.num_threads", "trainer.progress_bar", "trainer.log_every", "trainer.checkpoint_every",
    "trainer.distributed_timeout_min", "trainer.sharding", "eval.progress_bar", "model.loader.cache_dir",
)

# Run directories are named after the command-line overrides; a plain `cl-runner` gets "default".
if not OmegaConf.has_resolver("len"):  # e.g. a method's num_tasks: ${len:${task_sequence.tasks}}
    OmegaConf.register_new_resolver("len", lambda value: len(value))
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

    Settings the target's constructor does not take are a UserError naming the group, found
    before anything is built. Hydra wraps whatever the constructor raises in an
    InstantiationException: a UserError comes back out as itself (the CLI prints one line for
    it), anything else as the original exception, so a bug keeps its traceback.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    arguments = {k: v for k, v in node.items() if k != "name"}
    target = arguments.pop("_target_", None)
    constructor = locate(str(target), group)
    try:
        inspect.signature(constructor).bind(**arguments)
    except TypeError as exc:
        raise UserError(f"{group}: bad settings for {target} ({exc})") from exc
    except ValueError:  # no signature to check (a builtin): let the call decide
        pass
    try:
        # Not recursive: a nested block with its own _target_ (a method's peft: config) is the
        # constructor's to build, so that its errors are reported as the method's settings.
        return instantiate({"_target_": target, **arguments}, _recursive_=False)
    except InstantiationException as exc:
        user = find_user_error(exc)
        if user is not None:
            raise user from exc
        raise (exc.__cause__ or exc) from None


def locate(path: str, group: str):
    """The class or function a ``_target_`` names (``package.module.Name``)."""
    module_name, _, attribute = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"{group}._target_ '{path}' cannot be imported ({exc})") from exc
