"""Pictures (fast_ressl/plot.py): a tiny real run's curves and a bench report's bars are read back
as PNGs (pixel size, panels counted from the drawn axes frames, text chunks); the missing-matplotlib
error; train.precision=auto; no CUDA_HOME warning in a CPU run's output."""
import json
import logging
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fast_ressl import plot
from fast_ressl.cli import main, quiet_irrelevant_warnings
from fast_ressl.config import config_hash, load_config
from fast_ressl.train import train

from test_train import TINY


def _cfg(run_dir, *extra):
    return load_config(None, TINY + [f"run.dir={run_dir}", *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _frames(png):
    """Panels drawn in a PNG, counted from the pixels: every panel's axes frame has a black top
    and bottom edge, a horizontal run of near-black pixels wider than 20% of the picture (curves
    are coloured, grid lines light grey, text short)."""
    dark = np.asarray(Image.open(png).convert("RGB")).max(axis=2) < 100
    runs = 0
    for row in dark:
        edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        runs += int(((ends - starts) >= 0.2 * dark.shape[1]).sum())
    assert runs % 2 == 0, runs
    return runs // 2


def _read_png(path, panels, kind="run", bars=3):
    """Decodes the PNG; checks its size for that many panels and the panels it says it holds."""
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and im.size == plot.figure_size_px(len(panels), kind, bars)
        text = dict(im.text)
    assert text["Panels"] == ", ".join(panels)
    assert _frames(path) == len(panels)
    return text


def _block_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` now raises ImportError


def test_run_curves_after_a_resumed_run_with_a_skipped_step(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "train.ckpt_every=2", "train.stop_at_step=3"), live=False)
    last = run / "checkpoints" / "last.pt"  # the step-3 checkpoint: truncate it, as a kill mid-write
    data = last.read_bytes()
    with open(last, "r+b") as f:
        f.truncate(len(data) // 3)
    monkeypatch.setenv("FAST_RESSL_FAULT_NAN", "6:0")
    capsys.readouterr()
    train(_cfg(run, "train.ckpt_every=2"), live=False)  # resumes at step 2, re-logs step 3
    out = capsys.readouterr().out
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 3, 4, 5, 6, 7, 8]
    assert f"curves: {run / 'curves.png'}" in out  # drawn at the end of the run, and said where
    assert plot.find_resumes(rows, batch_size=8) == [3]
    assert plot.find_skips(rows) == [(6, 1)]
    text = _read_png(run / "curves.png", ["loss", "collapse", "lr & momentum", "images/s", "data wait"])
    assert text["Title"].startswith("run: test_resnet, global batch 8, fp32, completed at step 8/8")
    # the CLI redraws it (same panels) and says where
    (run / "curves.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run / 'curves.png'}"
    _read_png(run / "curves.png", ["loss", "collapse", "lr & momentum", "images/s", "data wait"])


def _rows(times, steps, rate=80.0, **extra):
    return [dict(step=s, epoch=(s - 1) // 4, loss=3.0 - 0.1 * i, lr=0.01, momentum=0.99, img_per_s=rate,
                 data_wait_frac=0.02, skipped_steps=0, time=t, **extra)
            for i, (s, t) in enumerate(zip(steps, times))]


def test_resume_detection_from_the_wall_clock():
    # batch 8 at 80 img/s: one step per 0.1 s; a 5 s start-up between steps 4 and 5 is a new invocation
    t = [100.0 + 0.1 * i for i in range(4)] + [100.3 + 5.0 + 0.1 * i for i in range(1, 5)]
    rows = _rows(t, range(1, 9))
    assert plot.find_resumes(rows, batch_size=8) == [4]
    assert plot.find_resumes(rows) == [4]  # without the batch size: over 10x the median gap
    assert plot.find_resumes(_rows([100.0 + 0.1 * i for i in range(8)], range(1, 9)), batch_size=8) == []
    assert plot.find_resumes(_rows([5.0, 4.0], [1, 2]), batch_size=8) == [1]  # clock went back


def test_knn_panel_and_no_collapse_panel(tmp_path):
    run = tmp_path / "old_run"  # rows as written before the collapse indicators existed, no config.yaml
    run.mkdir()
    rows = _rows([100.0 + 0.1 * i for i in range(8)], range(1, 9))
    knn = [{"step": 4, "epoch": 0, "knn_top1": 31.0, "time": 100.35},
           {"step": 8, "epoch": 1, "knn_top1": 42.5, "knn_top1_random_init": 30.1, "time": 100.75}]
    lines = [json.dumps(r) for r in rows[:4] + knn[:1] + rows[4:] + knn[1:]]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "ep')  # a cut last line
    path = plot.plot_run(run)
    assert path == run / plot.CURVES_PNG
    _read_png(path, ["loss", "lr & momentum", "kNN top-1", "images/s", "data wait"])


def test_bench_chart(tmp_path):
    def res(median):
        return {"unit": "source images/s", "median": median, "min": 0.9 * median, "max": 1.1 * median}

    runs = [{"variant": "fast", "config": {"train": {"precision": "bf16"}},
             "results": {"loader": res(280.0), "step": res(95.0), "e2e": res(33.0)}},
            {"variant": "reference", "config": {"train": {"precision": "fp32"}},
             "results": {"loader": res(186.0), "step": res(49.0), "e2e": res(35.0)}},
            {"variant": "no_amp", "config": {"train": {"precision": "fp32"}},
             "results": {"loader": {"skipped": "not measured"}, "step": res(65.0), "e2e": res(59.0)}}]
    report = {"machine": {"cpu_model": "test CPU", "cpu_count": 2, "gpu": None}, "versions": {"torch": "x"},
              "settings": {"modes": ["loader", "step", "e2e"]}, "runs": runs,
              "ratios": {"fast": {"loader": 1.5, "step": 1.94, "e2e": 0.94}, "no_amp": {"step": 1.33, "e2e": 1.69}}}
    out = tmp_path / "sub" / "bench.png"
    assert plot.plot_bench(report, out) == out
    _read_png(out, ["loader", "step", "e2e"], kind="bench")
    # a mode nobody measured gets no panel; the CLI writes the chart beside the JSON
    for r in runs:
        r["results"]["loader"] = {"skipped": "data.source=synthetic"}
    (tmp_path / "b.json").write_text(json.dumps(report))
    assert main(["plot-bench", str(tmp_path / "b.json")]) == 0
    _read_png(tmp_path / "b.png", ["step", "e2e"], kind="bench")


def test_bench_chart_of_a_sweep_widens_for_its_points(tmp_path):
    """A sweep's points are bars named by their overrides: the panel widens with the bar count (and
    the picture never gets narrower than its title)."""
    runs = [{"variant": v, "config": {"train": {"precision": "bf16"}},
             "results": {"loader": {"median": m, "min": m, "max": m}}}
            for v, m in (("fast", 500.0), ("data.num_threads=4 data.hw_decoder_load=0", 400.0),
                         ("data.num_threads=4 data.hw_decoder_load=0.9", 450.0),
                         ("data.num_threads=8 data.hw_decoder_load=0", 600.0),
                         ("data.num_threads=8 data.hw_decoder_load=0.9", 700.0))]
    report = {"machine": {"cpu_model": "test CPU", "cpu_count": 16, "gpu": None}, "versions": {"torch": "x"},
              "settings": {"modes": ["loader"]}, "runs": runs, "ratios": {}}
    out = tmp_path / "sweep.png"
    plot.plot_bench(report, out)
    _read_png(out, ["loader"], kind="bench", bars=5)
    assert plot.figure_size_px(1, "bench", bars=5)[0] == round(plot.BENCH_MIN_W_IN * plot.DPI)
    assert plot.figure_size_px(2, "bench", bars=5)[0] == round(2 * (4.4 + 2 * plot.BENCH_IN_PER_BAR) * plot.DPI)
    assert plot.figure_size_px(3, "bench") == (round(3 * 4.4 * plot.DPI), round((4.0 + plot.TITLE_IN) * plot.DPI))


def test_bench_plot_flag_draws_beside_the_json(tmp_path):
    """`fast-ressl bench ... --plot`: a real (tiny) measurement, its chart beside the JSON."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "fast_ressl", "bench", "-", "data.source=synthetic", "data.num_samples=64",
           "data.weak={size: 32}", "data.strong=[{size: 32}]", "model.backbone=test_resnet",
           "model.proj_hidden_dim=32", "model.proj_dim=16", "method.queue_size=64", "train.batch_size=8",
           "method.compile_loss=false", "--modes", "step", "--warmup", "1", "--iters", "1", "--repeats", "1",
           "--out", str(out), "--plot"]
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"wrote {tmp_path / 'bench.png'}" in res.stdout
    # the step mode's profiles: no kineto lines on a machine without CUDA (opcount.quiet_kineto_without_cuda)
    text = res.stdout + res.stderr
    assert "USDT:" not in text and "gpuGetDeviceCount" not in text and "Warning" not in text, text[-3000:]
    _read_png(tmp_path / "bench.png", ["step"], kind="bench")


def test_missing_matplotlib_is_one_clear_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _block_matplotlib(monkeypatch)
    train(_cfg(run, "train.stop_at_step=2"), live=False)  # the run itself must not fail
    out = capsys.readouterr().out
    assert out.count("curves: not drawn") == 1 and "pip install 'fast_ressl[plot]'" in out
    assert not (run / "curves.png").exists()
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == "error: plotting needs matplotlib, which is not installed: pip install 'fast_ressl[plot]'\n"
    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: no metrics.jsonl in")


def test_precision_auto_is_fp32_on_cpu_printed_and_resumable(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _cfg(run, "train.stop_at_step=2")
    assert cfg.train.precision == "auto"  # the default
    train(cfg, live=False)
    assert cfg.train.precision == "fp32"  # resolved in place for every later reader
    out = capsys.readouterr().out
    assert "on cpu x 1 rank(s), fp32 (auto: CPU), global batch 8" in out
    assert load_config(run / "config.yaml").train.precision == "fp32"
    # resuming with auto again is the same run: same hash as the explicit fp32 config, no refusal
    summary = train(_cfg(run), live=False)
    assert summary["step"] == 8 and summary["config_hash"] == config_hash(_cfg(run, "train.precision=fp32"))
    assert "resumed from" in capsys.readouterr().out
    explicit = _cfg(tmp_path / "bf16", "train.precision=bf16", "train.stop_at_step=1")
    train(explicit, live=False)
    assert "on cpu x 1 rank(s), bf16, global batch" in capsys.readouterr().out  # explicit wins, no note


def test_cuda_home_message_is_dropped_and_others_pass(caplog):
    quiet_irrelevant_warnings()
    logger = logging.getLogger("torch.utils.cpp_extension")
    with caplog.at_level(logging.WARNING, logger="torch.utils.cpp_extension"):
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for %s", "c++")
    assert [r.getMessage() for r in caplog.records] == ["Error checking compiler version for c++"]


def test_cpu_run_prints_no_unrelated_warnings(tmp_path):
    """A fresh process through the CLI with the compiled loss (torch.compile imports cpp_extension,
    which logs the CUDA_HOME line on a machine with a CUDA toolkit directory and no GPU)."""
    over = [o for o in TINY if not o.startswith("method.compile_loss")] + [
        "method.compile_loss=true", "train.stop_at_step=2", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run([sys.executable, "-m", "fast_ressl", "train", "/dev/null", *over],  # empty recipe
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "CUDA_HOME" not in text and "No CUDA runtime" not in text
    assert not re.search(r"^[WE]\d{4} ", text, re.M), text  # torch's glog-style warning/error lines
    assert "Warning" not in text, text  # Python warnings (UserWarning, FutureWarning, ...)
    assert "fp32 (auto: CPU)" in proc.stdout
