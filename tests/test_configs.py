"""Every YAML under conf/ composes, and every method YAML builds a working method."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cl_runner.runner import build
from conftest import REPO, compose_config

CONF = REPO / "conf"
GROUPS = ["model", "task_sequence", "method", "replay", "eval", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    extra = ["model.name_or_path=some-org/some-model"] if (group, option) == ("model", "hf") else []
    cfg = compose_config([f"{group}={option}", *extra])
    # Resolve everything a run resolves, then check the option's own keys landed in the config.
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    own = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    own.pop("defaults", None)
    target = container if group == "experiment" else container[group]
    for key, value in own.items():
        assert key in target, f"{group}={option}: '{key}' missing after composition"
        if value != "???" and (not isinstance(value, (dict, str)) or "${" not in str(value)):
            assert target[key] == value or isinstance(value, dict), f"{group}={option}: {key}"
    if "name" in own:
        assert own["name"] == option  # run labels match the option users type


def test_groups_have_the_documented_defaults():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.method.name, cfg.replay.name, cfg.task_sequence.name) == ("smollm2_135m", "seq_lora", "none", "word_positions")
    assert cfg.logger.mode == "offline"


def test_misspelled_key_is_rejected_at_compose_time():
    with pytest.raises(Exception, match="lrr"):
        compose_config(["trainer.lrr=1"])


@pytest.mark.parametrize("method", options("method"))
def test_every_method_trains_something_and_checkpoints(method, tiny_model_and_tokenizer, tmp_path):
    """Each method: setup leaves trainable parameters, and save/load restores them exactly."""
    import copy

    import torch

    model = copy.deepcopy(tiny_model_and_tokenizer[0])
    built = build(compose_config([f"method={method}"]).method)
    model = built.setup(model)
    built.before_task(model, 0, task=None)
    params = list(built.trainable_parameters(model))
    assert params, f"{method} trains no parameters"
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    built.save_checkpoint(model, tmp_path, 0)
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh = build(compose_config([f"method={method}"]).method)
    restored = fresh.setup(copy.deepcopy(tiny_model_and_tokenizer[0]))
    fresh.load_checkpoint(restored, [tmp_path])
    got = dict(restored.named_parameters())
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


def test_conf_has_no_stray_yaml():
    """Each YAML is in a known group (a typo'd folder would silently never be used)."""
    known = set(GROUPS) | {"hydra", "local"}
    for path in CONF.rglob("*.yaml"):
        rel = path.relative_to(CONF)
        assert rel.parts[0] in known or rel == Path("config.yaml"), rel


def test_run_directory_name_ignores_exactly_the_resume_safe_keys():
    """Two lists must agree: what may change on resume, and what does not rename the run directory."""
    from cl_runner.config import RESUME_SAFE_KEYS, is_resume_safe

    hydra_cfg = yaml.safe_load((CONF / "hydra" / "default.yaml").read_text())
    excluded = set(hydra_cfg["job"]["config"]["override_dirname"]["exclude_keys"]) - {"hydra.run.dir", "hydra.sweep.dir"}
    assert set(RESUME_SAFE_KEYS) <= excluded
    assert all(is_resume_safe(key) for key in excluded)
