"""`fast-ressl bench` (loader / step / e2e, fast vs reference) and `make-bench-data` on a tiny CPU config."""
import json

import numpy as np
import pytest

from fast_ressl import bench
from fast_ressl.benchdata import make_bench_data
from fast_ressl.cli import main

TINY = ["model.backbone=test_resnet", "model.proj_hidden_dim=32", "model.proj_dim=16",
        "method.queue_size=64", "method.compile_loss=false", "data.weak={size: 32}",
        "data.strong=[{size: 32}]", "data.num_threads=1", "data.num_samples=16", "data.scan=false",
        "train.batch_size=8", "run.device=cpu"]
FAST = dict(warmup=1, iters=1, repeats=2)


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "jpegs"
    stats = make_bench_data(root, images=24, classes=3, quiet=True)
    return root, stats


def _check_result(res, mode):
    assert res["unit"] == "source images/s"
    assert len(res["samples"]) == FAST["repeats"]
    assert res["min"] <= res["median"] <= res["max"] and res["median"] > 0
    assert res["spread_pct"] >= 0
    if mode in ("step", "e2e"):
        assert res["flops_per_image"] > 0 and res["tflops"] > 0 and res["peak_memory_mb"] > 0
    if mode == "e2e":
        assert 0.0 <= res["data_wait_fraction"]["median"] <= 1.0


def _check_schema(report, modes, variants):
    assert report["schema"] == bench.SCHEMA
    assert {"platform", "cpu_count", "gpu"} <= report["machine"].keys()
    assert {"python", "torch", "timm", "dali"} <= report["versions"].keys()
    assert report["settings"]["modes"] == modes
    assert [r["variant"] for r in report["runs"]] == variants
    for run in report["runs"]:
        assert run["config"]["model"]["backbone"] == "test_resnet"
        for mode in modes:
            _check_result(run["results"][mode], mode)


def test_make_bench_data_sizes(bench_data):
    from PIL import Image

    root, stats = bench_data
    files = sorted(root.rglob("*.JPEG"))
    assert len(files) == 24 and len({f.parent.name for f in files}) == 3
    widths, heights, kbs = [], [], []
    for f in files:
        with Image.open(f) as im:
            assert im.format == "JPEG"
            im.load()  # decodes
            widths.append(im.width)
            heights.append(im.height)
        kbs.append(f.stat().st_size / 1024)
    assert 300 <= np.mean(widths) <= 480 and 280 <= np.mean(heights) <= 420
    assert 60 <= np.mean(kbs) <= 170  # ImageNet-like ~110 KB on average
    assert abs(stats["mean_kb"] - np.mean(kbs)) < 1
    # reused, not rewritten, when complete
    mtime = files[0].stat().st_mtime_ns
    make_bench_data(root, images=24, classes=3, quiet=True)
    assert files[0].stat().st_mtime_ns == mtime


def test_step_fast_vs_reference_json(tmp_path):
    out = tmp_path / "bench.json"
    s = bench.BenchSettings(modes=["step"], out=str(out), **FAST)
    report = bench.run_bench(None, TINY, s)
    saved = json.loads(out.read_text())
    assert saved["ratios"] == report["ratios"]
    _check_schema(saved, ["step"], ["fast", "reference"])
    assert saved["ratios"]["fast"]["step"] > 0
    fast, ref = (r["config"] for r in saved["runs"])
    # the reference preset really runs the original way
    assert (ref["train"]["precision"], ref["train"]["channels_last"]) == ("fp32", False)
    assert (ref["model"]["compile"], ref["method"]["compile_loss"], ref["optim"]["fused"]) == (False, False, False)
    assert ref["data"]["loader"] == "torch" and ref["data"]["dtype"] == "fp32"
    assert [r["ema"] for r in saved["runs"]] == ["foreach", "python-loop"]
    assert fast["train"]["precision"] == "bf16" and fast["train"]["channels_last"] is True
    assert fast["data"]["source"] == "synthetic"  # step mode: synthetic tensors


def test_loader_and_e2e_with_ablation(tmp_path, bench_data):
    root, _ = bench_data
    out = tmp_path / "b.json"
    s = bench.BenchSettings(modes=["loader", "e2e"], variants=["fast", "reference"], ablate=["amp"],
                            data=str(root), out=str(out), **FAST)
    report = bench.run_bench(None, TINY, s)
    _check_schema(json.loads(out.read_text()), ["loader", "e2e"], ["fast", "reference", "no_amp"])
    by = {r["variant"]: r for r in report["runs"]}
    assert by["fast"]["results"]["loader"]["loader"] == "dali"
    assert by["reference"]["results"]["e2e"]["loader"] == "torch"
    assert by["no_amp"]["config"]["train"]["precision"] == "fp32"
    assert by["fast"]["config"]["data"]["root"] == str(root)
    assert set(report["ratios"]) == {"fast", "no_amp"}


def test_reference_ema_matches_foreach():
    import torch

    from fast_ressl.model import ema_update_

    t1, s1 = [torch.randn(4, 3), torch.randn(5)], [torch.randn(4, 3), torch.randn(5)]
    t2 = [t.clone() for t in t1]
    ema_update_(t1, s1, 0.9)
    bench.reference_ema_(t2, s1, 0.9)
    for a, b in zip(t1, t2):
        torch.testing.assert_close(a, b)
    keep = [t.clone() for t in t2]
    bench.reference_ema_(t2, s1, 0.9, enabled=torch.tensor(False))
    for a, b in zip(keep, t2):
        torch.testing.assert_close(a, b)


def test_cli_bench_preset_reference(tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = main(["bench", "-", *TINY, "preset=reference", "--modes", "step", "--warmup", "1", "--iters", "1",
               "--repeats", "2", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["runs"]] == ["reference"]
    assert report["runs"][0]["config"]["train"]["precision"] == "fp32"
    assert "step" in capsys.readouterr().out


def test_synthetic_source_skips_loader_modes(tmp_path):
    s = bench.BenchSettings(modes=["loader"], variants=["fast"], out=None, **FAST)
    report = bench.run_bench(None, TINY + ["data.source=synthetic"], s)
    assert "skipped" in report["runs"][0]["results"]["loader"]
