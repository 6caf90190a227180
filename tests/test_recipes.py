"""Every recipe in configs/ loads, builds, runs a few steps at tiny resolution on the synthetic
source, and its exported backbone loads in timm."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from fast_ressl import evaluate as E
from fast_ressl.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
EXPECTED = {"imagenet_resnet50", "imagenet_resnet50_5crop", "small_resnet18_32px", "small_resnet18_64px",
            "efficientnet_b0", "mobilenetv3_large_100", "mobilenetv3_small_100", "resnet18", "demo",
            "small_resnet18_cifar100"}


def test_all_recipes_present():
    assert EXPECTED <= {p.stem for p in CONFIGS}


def _tiny(path: Path, run_dir: Path):
    import yaml

    raw = yaml.safe_load(path.read_text())
    views = len(raw.get("data", {}).get("strong", [None]))
    strong = "[" + ", ".join(["{size: 32}"] + ["{size: 24}"] * (views - 1)) + "]"  # keep the view count
    return load_config(path, [
        "data.source=synthetic", "data.num_samples=16", "data.num_classes=4", "data.weak.size=32",
        f"data.strong={strong}", "data.eval_resize=32", "train.batch_size=8", "method.queue_size=64",
        "train.epochs=1", "train.precision=fp32", "train.channels_last=false",
        "method.compile_loss=false", "eval.knn_every_epochs=0", "eval.knn_compare_random=false",
        "train.log_every=1", "train.ckpt_every=2", f"run.dir={run_dir}"]), raw


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_runs_and_exports(path, tmp_path):
    from fast_ressl.train import train

    cfg, raw = _tiny(path, tmp_path / "run")
    assert cfg.model.backbone == raw.get("model", {}).get("backbone", "resnet50")
    assert len(cfg.data.strong) == len(raw["data"].get("strong", [None]))
    summary = train(cfg, live=False)
    assert summary["step"] == 2 and summary["final_loss"] is not None
    out = tmp_path / "backbone.safetensors"
    E.export_backbone(tmp_path / "run", out)
    name = cfg.model.backbone
    if cfg.model.small_input_stem:
        model = E.load_exported(out)
    else:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=0))
    model.eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, E.feature_dim(timm.create_model(name, num_classes=0)))
