"""Every YAML under conf/ composes, and every method YAML builds a working method."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from cl_runner.config import build
from conftest import REPO, compose_config, task_with_inputs

CONF = REPO / "conf"
GROUPS = ["model", "task_sequence", "method", "replay", "eval", "logger", "experiment", "recipe"]
GLOBAL_GROUPS = ("experiment", "recipe")  # # @package _global_: their keys land at the top


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# Methods that write edit tasks into the weights in closed form: no trainable parameters, and
# they need edit tasks (tests/test_editing_methods.py and the resume test cover them).
EDIT_METHODS = {"rome", "memit", "alphaedit"}


def tiny_layers(method: str) -> list[str]:
    """Overrides that put an editor's layers inside the 2-layer tiny model."""
    return {"rome": ["method.layer=0"], "memit": ["method.layers=[0,1]"], "alphaedit": ["method.layers=[0,1]", "method.nullspace_threshold=1e-4"],
            "edit_plus_lora": ["method.editor.layer=0", "method.editor.covariance.tokens=2000"]}.get(method, [])


def trained_methods() -> list[str]:
    return [m for m in options("method") if m not in EDIT_METHODS]


def assert_landed(own: dict, composed: dict, where: str) -> None:
    """Every key the YAML sets is in the composed config with the YAML's value (recursively; interpolations and ??? aside)."""
    for key, value in own.items():
        assert key in composed, f"{where}: '{key}' missing after composition"
        if isinstance(value, dict):
            assert isinstance(composed[key], dict), f"{where}: {key}"
            assert_landed(value, composed[key], f"{where}.{key}")
        elif value != "???" and "${" not in str(value):
            assert composed[key] == value, f"{where}: {key}"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    extra = ["model.name_or_path=some-org/some-model"] if (group, option) == ("model", "hf") else []
    cfg = compose_config([f"{group}={option}", *extra])
    # Resolve everything a run resolves, then check the option's own keys landed in the config.
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    own = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    defaults = own.pop("defaults", None) or []
    own.pop("hydra", None)  # Hydra's own settings are not in the job's config (see the sweep test below)
    target = container if group in GLOBAL_GROUPS else container[group]
    for entry in defaults:  # e.g. `override /method: prompt_tuning` must pick that method
        if isinstance(entry, dict) and len(entry) == 1 and next(iter(entry)).startswith("override /method"):
            assert container["method"]["name"] == next(iter(entry.values())), f"{group}={option}: method"
    assert_landed(own, target, f"{group}={option}")
    if "name" in own:
        assert own["name"] == option  # run labels match the option users type


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_sweeps_name_existing_options(experiment):
    """An experiment's built-in sweep (hydra.sweeper.params) names only options that exist, so the
    one command that reproduces a README table cannot fail on its 40th job."""
    params = (yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text()).get("hydra") or {}).get("sweeper", {}).get("params", {})
    for key, values in params.items():
        if key in GROUPS:
            missing = [v for v in str(values).split(",") if v not in options(key)]
            assert not missing, f"experiment={experiment} sweeps {key} over missing options {missing}"


def test_groups_have_the_documented_defaults():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.method.name, cfg.replay.name, cfg.task_sequence.name) == ("smollm2_135m", "seq_lora", "none", "word_positions")
    assert cfg.logger.mode == "offline"


def test_misspelled_key_is_rejected_at_compose_time():
    with pytest.raises(Exception, match="lrr"):
        compose_config(["trainer.lrr=1"])


def check_trains_exactly_its_parameters(method_cfg, tiny_model_and_tokenizer, tmp_path, trainer_overrides=()):
    """A few real optimizer steps change exactly the parameters the method trains, leave every other
    tensor bit-identical, and a save/load round trip restores the trained ones exactly."""
    import copy

    import torch

    from cl_runner.replay import NoReplay
    from cl_runner.training import TrainingLoop

    base, tokenizer = tiny_model_and_tokenizer
    trainer = compose_config(["model=tiny", "trainer.max_steps=3", "trainer.batch_size=2", "trainer.progress_bar=false", *trainer_overrides]).trainer
    built = build(method_cfg, "method")
    model = built.setup(copy.deepcopy(base))
    task, examples = task_with_inputs(tokenizer)
    built.before_task(model, 0, task)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "the method trains no parameters"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    loop = TrainingLoop(trainer, torch.device("cpu"), tokenizer.pad_token_id)
    stats = loop.train(model, built.trainable_parameters(model), examples, built, NoReplay(), seed=0)
    assert stats["steps"] == 3
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, f"changed but frozen: {sorted(changed - trainable)[:3]}; trainable but unchanged: {sorted(trainable - changed)[:3]}"

    built.after_task(model, 0, task)
    built.consolidate(model, 0, examples, loop.probe(model, list(built.trainable_parameters(model))))
    built.save_checkpoint(model, tmp_path, 0)
    fresh = build(method_cfg, "method")
    restored = fresh.setup(copy.deepcopy(base))
    fresh.load_checkpoint(restored, [tmp_path])
    # InfLoRA's input-space bases, CoLoR's prototypes, EWC's Fisher and anchor, GEM's episodic memory
    for state in ("bases", "prototypes", "fisher", "anchor", "memories"):
        if hasattr(built, state):
            saved, loaded = getattr(built, state), getattr(fresh, state)
            assert (saved.numel() if isinstance(saved, torch.Tensor) else len(saved)), f"{state} is empty after the first task"
            if isinstance(saved, dict):
                assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved), state
            else:
                assert torch.equal(saved, loaded) if isinstance(saved, torch.Tensor) else saved == loaded, state
    with torch.no_grad():  # the restored model computes what the trained one computes (up to rounding: OSF stores merged weights)
        ids = torch.tensor([examples[0].input_ids])
        torch.testing.assert_close(restored.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    return model


@pytest.mark.parametrize("method", sorted(EDIT_METHODS))
def test_edit_methods_train_no_parameters(method, tiny_model_and_tokenizer):
    import copy

    built = build(compose_config([f"method={method}", *tiny_layers(method)]).method, "method")
    model = built.setup(copy.deepcopy(tiny_model_and_tokenizer[0]))
    assert list(built.trainable_parameters(model)) == [] and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", trained_methods())
def test_every_method_trains_exactly_its_parameters_and_checkpoints_them(method, tiny_model_and_tokenizer, tmp_path):
    check_trains_exactly_its_parameters(compose_config([f"method={method}", *tiny_layers(method)]).method, tiny_model_and_tokenizer, tmp_path)


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
    # Every logger setting is resume-safe, so each must leave the run directory's name alone too.
    for path in (CONF / "logger").glob("*.yaml"):
        keys = {f"logger.{k}" for k in yaml.safe_load(path.read_text()) if not k.startswith("_")}
        assert keys <= excluded, f"{path.name}: {sorted(keys - excluded)} missing from hydra.job.config.override_dirname.exclude_keys"
