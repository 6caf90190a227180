"""Typed config: defaults, recipes, overrides, errors that name the key, invariants, safe YAML."""
from pathlib import Path

import pytest

from fast_ressl.config import (Config, ConfigError, config_hash, from_dict, load_config, to_dict,
                               to_yaml)

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_are_the_paper_recipe():
    cfg = load_config(None, ["data.source=synthetic"])
    assert isinstance(cfg, Config)
    assert (cfg.method.tau_s, cfg.method.tau_t, cfg.method.queue_size) == (0.1, 0.04, 131072)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.batch_size) == (0.05, 1e-4, 256)
    assert cfg.model.backbone == "resnet50" and cfg.method.momentum == 0.999


def test_recipe_and_overrides_apply_in_order(tmp_path):
    p = _write(tmp_path, "train: {epochs: 7, batch_size: 64}\nmethod: {queue_size: 1024}\n"
                         "data: {source: synthetic}\n")
    cfg = load_config(p, ["train.epochs=3", "method.tau_t=0.05", "data.strong=[{size: 96}, {size: 64}]"])
    assert cfg.train.epochs == 3 and cfg.train.batch_size == 64 and cfg.method.tau_t == 0.05
    assert [v.size for v in cfg.data.strong] == [96, 64]
    assert cfg.data.strong[1].scale_min == 0.2  # list items get the schema's defaults
    assert cfg.run.name == "recipe"  # the run is named after the recipe file


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["data.source=synthetic", "train.epochs=3", "model.predictor=true"])
    p = _write(tmp_path, to_yaml(cfg), "dump.yaml")
    again = load_config(p)
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    assert config_hash(again) == config_hash(cfg)


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="method.tau_x"):
        load_config(None, ["method.tau_x=0.1"])
    p = _write(tmp_path, "train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(p)
    with pytest.raises(ConfigError, match="no_section"):
        load_config(None, ["no_section.x=1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="model.predictor"):
        load_config(None, ["model.predictor=maybe"])


def test_invariants_name_the_keys():
    with pytest.raises(ConfigError, match="method.queue_size"):
        load_config(None, ["data.source=synthetic", "method.queue_size=1000", "train.batch_size=256"])
    with pytest.raises(ConfigError, match="world size 3"):
        load_config(None, ["data.source=synthetic", "train.batch_size=256"], world_size=3)
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["data.source=synthetic", "train.precision=fp8"])
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="model.teacher_bn=sync .* model.bn_group_size=32"):
        load_config(None, ["data.source=synthetic", "model.teacher_bn=sync", "model.bn_group_size=32"])
    with pytest.raises(ConfigError, match=r"data.strong\[0\]"):
        load_config(None, ["data.source=synthetic", "data.strong=[{size: 32, scale_min: 0.9, scale_max: 0.5}]"])
    with pytest.raises(ConfigError, match="data.augment.blur_p"):
        load_config(None, ["data.source=synthetic", "data.augment.blur_p=1.5"])
    with pytest.raises(ConfigError, match="model.compile_mode=reduce-overhead applies to the compiled networks"):
        load_config(None, ["data.source=synthetic", "model.compile_mode=reduce-overhead"])
    with pytest.raises(ConfigError, match="model.compile_mode='fastest' is not one of default"):
        load_config(None, ["data.source=synthetic", "model.compile=true", "model.compile_mode=fastest"])
    assert load_config(None, ["data.source=synthetic", "model.compile=true",
                              "model.compile_mode=reduce-overhead"]).model.compile_mode == "reduce-overhead"


@pytest.mark.parametrize("overrides, named", [
    (["model.backbone=notamodel", "model.small_input_stem=false"], "model.backbone='notamodel' is not a timm model"),
    # not "needs a ResNet backbone": the name itself is what is wrong
    (["model.backbone=notamodel"], "model.backbone='notamodel' is not a timm model"),
    (["run.device=cuda"], "run.device=cuda but no CUDA device is visible"),
])
def test_train_refuses_a_bad_backbone_or_device_in_one_line(overrides, named, tmp_path, capsys):
    """`fast-ressl train`: exit code 2 and one `config error:` line naming the key, before a run
    directory is made (both were tracebacks, exit 1; the bad backbone left a run directory holding
    only its lock file)."""
    import torch

    from fast_ressl.cli import main

    if "run.device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("a visible CUDA device")
    run = tmp_path / "run"
    rc = main(["train", str(REPO / "configs" / "demo.yaml"), *overrides, "data.source=synthetic",
               "data.num_samples=64", f"run.dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "Traceback" not in err, err
    if "run.device=cuda" not in overrides:
        assert not run.exists()


def test_unsafe_yaml_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    p = _write(tmp_path, f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not a safe YAML"):
        load_config(p)
    assert not marker.exists()


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_run_control_keys_do_not_change_the_hash():
    a = load_config(None, ["data.source=synthetic"])
    b = load_config(None, ["data.source=synthetic", "train.stop_at_step=5", "train.log_every=1"])
    c = load_config(None, ["data.source=synthetic", "train.epochs=5"])
    assert config_hash(a) == config_hash(b) != config_hash(c)


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(recipe):
    load_config(recipe, ["data.root=/tmp"])
