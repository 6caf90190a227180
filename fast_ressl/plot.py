"""Pictures of a run and of a benchmark: `fast-ressl plot RUN_DIR` (also drawn at the end of every
run, rank 0) and `fast-ressl plot-bench BENCH_JSON`.

matplotlib is the optional `plot` extra (`pip install 'fast_ressl[plot]'`), imported here lazily.
Figures are drawn through matplotlib's object API on its Agg canvas (`Figure` + `FigureCanvasAgg`,
never pyplot): nothing needs a display, no global backend is switched in the process that calls
us (a notebook keeps its own), and no figure outlives the call.

Every PNG records what it shows in text chunks (`Panels`: the panel names in order, `Title`), so a
reader (the tests, a script) can check the picture's content without parsing pixels. Sizes are
fixed by the panel count (no tight bounding box): see `figure_size_px`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

CURVES_PNG = "curves.png"
INSTALL_HINT = "pip install 'fast_ressl[plot]'"
COLLAPSE_KEYS = ("target_entropy_frac", "queue_mean_cos")
KNN_BASELINES = {"random_init": "same backbone, random init", "raw_pixels": "raw pixels"}

DPI = 100
# Run curves: panels in 2 columns, 6.0 x 2.6 inch each, plus a 0.5 inch title band (1200 px wide).
RUN_PANEL_IN, RUN_COLS, TITLE_IN = (6.0, 2.6), 2, 0.5
# Benchmark: one panel per mode, side by side, 4.4 x 4.0 inch each (+ the title band); 1.4 inch
# wider for each bar past 3 (a sweep's points: room for "hw_decoder_load=0.95" at 8 pt), and never
# narrower than the title (8 inch).
BENCH_PANEL_IN, BENCH_IN_PER_BAR, BENCH_MIN_W_IN = (4.4, 4.0), 1.4, 8.0

# A new invocation is recognised when the wall clock between two rows exceeds what the later row's
# own interval explains by more than this (s). Within one invocation the difference is the gap
# between two clock reads (microseconds); a new process spends seconds importing torch and setting up.
RESUME_SLACK_S = 1.0
# Without config.yaml (no batch size to explain the gaps): a gap this many times the median.
RESUME_GAP_FACTOR = 10.0


class PlotError(RuntimeError):
    """A user error (missing input, missing matplotlib): the CLI prints `error: ...` and exits 2."""


class PlotUnavailable(PlotError):
    """matplotlib is not installed."""


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable(f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return Figure, FigureCanvasAgg


def figure_size_px(panels: int, kind: str = "run", bars: int = 3) -> Tuple[int, int]:
    """(width, height) in pixels of a picture with this many panels (bench: and bars per panel)."""
    if kind == "run":
        rows = math.ceil(panels / RUN_COLS)
        w, h = RUN_COLS * RUN_PANEL_IN[0], rows * RUN_PANEL_IN[1] + TITLE_IN
    else:
        panel_w = BENCH_PANEL_IN[0] + BENCH_IN_PER_BAR * max(0, bars - 3)
        w, h = max(panels * panel_w, BENCH_MIN_W_IN), BENCH_PANEL_IN[1] + TITLE_IN
    return round(w * DPI), round(h * DPI)


# ----------------------------------------------------------------------------- run curves
def read_metrics(path: Path) -> Tuple[List[dict], List[dict]]:
    """(train rows, kNN rows) of a metrics.jsonl. A line that does not parse (the last line of a
    killed run may be cut short) is skipped."""
    train, knn = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        if "loss" in row and "step" in row:
            train.append(row)
        elif "knn_top1" in row:
            knn.append(row)
    return train, knn


def find_resumes(rows: Sequence[dict], batch_size: Optional[int] = None) -> List[int]:
    """Indices of the train rows that open a new invocation of the run (a resume).

    Within one invocation a row's interval runs from the previous row's log time (checkpoints and
    the kNN monitor in between included), so time[i] - time[i-1] equals the interval's images /
    img_per_s to within microseconds. A resume shows as: the step going back (a killed run re-logs
    the steps after its last checkpoint), the wall clock going back, or a gap the interval does not
    explain (the new process's start-up, seconds). Without the global batch size (no config.yaml)
    a gap over RESUME_GAP_FACTOR times the median gap counts instead. Not seen: a stop in the middle
    of a log interval whose restart took less time than the unlogged steps before the stop."""
    out: List[int] = []
    gaps = [b.get("time", 0.0) - a.get("time", 0.0) for a, b in zip(rows, rows[1:])]
    median_gap = statistics.median(gaps) if gaps else 0.0
    for i in range(1, len(rows)):
        a, b = rows[i - 1], rows[i]
        gap = gaps[i - 1]
        if b["step"] <= a["step"] or gap < 0:
            out.append(i)
            continue
        rate = b.get("img_per_s") or 0.0
        if batch_size and rate > 0:
            explained = (b["step"] - a["step"]) * batch_size / rate
            if gap - explained > RESUME_SLACK_S:
                out.append(i)
        elif median_gap > 0 and gap > RESUME_GAP_FACTOR * median_gap:
            out.append(i)
    return out


def find_skips(rows: Sequence[dict]) -> List[Tuple[int, int]]:
    """(step, newly skipped steps) for every row whose cumulative skipped_steps grew."""
    out, prev = [], 0
    for i, r in enumerate(rows):
        n = int(r.get("skipped_steps") or 0)
        if i > 0 and r["step"] <= rows[i - 1]["step"]:  # a resume re-counts from its checkpoint
            prev = min(prev, n)
        if n > prev:
            out.append((r["step"], n - prev))
        prev = n
    return out


def run_panels(train: Sequence[dict], knn: Sequence[dict]) -> List[str]:
    """The panels a run's picture has, in order: a function of which fields the rows carry."""
    panels = ["loss"]
    if any(k in r for r in train for k in COLLAPSE_KEYS):
        panels.append("collapse")
    panels.append("lr & momentum")
    if knn:
        panels.append("kNN top-1")
    panels += ["images/s", "data wait"]
    return panels


def _segments(rows: Sequence[dict], resumes: Sequence[int]) -> List[Sequence[dict]]:
    bounds = [0, *resumes, len(rows)]
    return [rows[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _title(run_dir: Path, cfg: dict, train: Sequence[dict]) -> str:
    """'<run>: <backbone>, global batch N, <precision>, <status> at step S/T' (the parts known)."""
    t = cfg.get("train", {})
    parts = [f"{run_dir.resolve().name}: {cfg.get('model', {}).get('backbone', 'run')}"]
    if "batch_size" in t:
        parts.append(f"global batch {t['batch_size']}")
    if "precision" in t:
        parts.append(str(t["precision"]))
    try:
        s = json.loads((run_dir / "summary.json").read_text())
        parts.append(f"{s['status']} at step {s['step']}/{s['total_steps']}")
    except (OSError, ValueError, KeyError):
        parts.append(f"step {train[-1]['step']}")
    return ", ".join(parts)


def plot_run(run_dir: os.PathLike | str, out: Optional[os.PathLike | str] = None) -> Path:
    """Draw RUN_DIR/metrics.jsonl into RUN_DIR/curves.png (or `out`); returns the PNG's path.

    Panels (see run_panels): loss; the collapse indicators when the rows carry them; lr and teacher
    momentum; kNN top-1 over epochs when the run logged any; images/s; data-wait fraction. All but
    kNN are against the step. Resumes are dashed grey verticals, steps with a skipped (non-finite)
    update red ones."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"no metrics.jsonl in {run_dir} (is it a run directory?)")
    train, knn = read_metrics(metrics)
    if not train:
        raise PlotError(f"{metrics} has no training rows yet (the first appears after train.log_every steps)")
    Figure, FigureCanvasAgg = _matplotlib()
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    cfg = _read_yaml(run_dir / "config.yaml")
    resumes = find_resumes(train, cfg.get("train", {}).get("batch_size"))
    skips = find_skips(train)
    segments = _segments(train, resumes)
    panels = run_panels(train, knn)

    w, h = figure_size_px(len(panels))
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    rows = math.ceil(len(panels) / RUN_COLS)
    # column gap: the lr panel's right-hand momentum axis and the next panel's y labels
    grid = _grid(fig, rows, RUN_COLS, left=0.8, right=0.8, top=TITLE_IN + 0.3, bottom=0.55,
                 wgap=1.55, hgap=0.8)
    title = _title(run_dir, cfg, train)
    fig.suptitle(title, fontsize=11)

    def line(ax, x, y, color, **kw):
        # short runs (the demo logs 8 rows) get dots, so a single row is still visible
        ax.plot(x, y, color=color, lw=1.2, marker="o" if len(train) <= 60 else None, ms=3, **kw)

    def series(key: str, scale: float = 1.0):
        for seg in segments:
            pts = [(r["step"], r[key] * scale) for r in seg if r.get(key) is not None]
            if pts:
                yield [p[0] for p in pts], [p[1] for p in pts]

    def marks(ax, legend: bool) -> None:
        for i, idx in enumerate(resumes):
            ax.axvline(train[idx]["step"], color="0.45", ls="--", lw=1.0,
                       label=f"resumed ({len(resumes)})" if legend and i == 0 else None)
        for i, (step, n) in enumerate(skips):
            ax.axvline(step, color="tab:red", alpha=0.5, lw=1.0,
                       label=f"skipped steps ({sum(k for _, k in skips)})" if legend and i == 0 else None)

    def draw_loss(ax):
        for x, y in series("loss"):
            line(ax, x, y, "tab:blue")
        marks(ax, legend=True)
        ax.set_ylabel("loss")
        if resumes or skips:
            ax.legend(loc="upper right", fontsize=8)

    def draw_collapse(ax):
        for key, color, label in (("target_entropy_frac", "tab:purple", "target entropy / log K"),
                                  ("queue_mean_cos", "tab:brown", "queue mean cosine")):
            for j, (x, y) in enumerate(series(key)):
                line(ax, x, y, color, label=label if j == 0 else None)
        marks(ax, legend=False)
        ax.set_ylabel("1.0 = collapsed")
        ax.legend(loc="best", fontsize=8)

    def draw_lr(ax):
        for x, y in series("lr"):
            line(ax, x, y, "tab:blue")
        ax.set_ylabel("lr", color="tab:blue")
        twin = ax.twinx()
        for x, y in series("momentum"):
            line(twin, x, y, "tab:orange")
        twin.set_ylabel("teacher momentum", color="tab:orange")
        marks(ax, legend=False)

    def draw_knn(ax):
        x = [r["epoch"] + 1 for r in knn]  # the row's epoch is the one just completed, 0-based
        ax.plot(x, [r["knn_top1"] for r in knn], "o-", color="tab:green", lw=1.2, label="pretrained")
        # baselines logged beside it (knn_top1_<name>: random_init, raw_pixels, ...) as markers
        names = sorted({k[len("knn_top1_"):] for r in knn for k in r if k.startswith("knn_top1_")})
        for j, name in enumerate(names):
            pts = [(r["epoch"] + 1, r[f"knn_top1_{name}"]) for r in knn if f"knn_top1_{name}" in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "xP^sv"[j % 5], color=("0.4", "tab:red",
                    "tab:olive", "tab:pink", "tab:brown")[j % 5], ms=8, mew=2,
                    label=KNN_BASELINES.get(name, name.replace("_", " ")))
        ax.set_xlabel("epochs completed")
        epochs = sorted(set(x))
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("kNN top-1 (%)")
        ax.legend(loc="best", fontsize=8)

    def draw_speed(ax):
        for x, y in series("img_per_s"):
            line(ax, x, y, "tab:cyan")
        ax.set_ylabel("images/s")
        ax.set_ylim(bottom=0)
        marks(ax, legend=False)

    def draw_wait(ax):
        for x, y in series("data_wait_frac", 100.0):
            line(ax, x, y, "tab:gray")
        ax.set_ylabel("data wait (% of wall)")
        ax.set_ylim(bottom=0)
        marks(ax, legend=False)

    draw: Dict[str, Callable[[Any], None]] = {
        "loss": draw_loss, "collapse": draw_collapse, "lr & momentum": draw_lr, "kNN top-1": draw_knn,
        "images/s": draw_speed, "data wait": draw_wait}
    for i, name in enumerate(panels):
        ax = fig.add_subplot(grid[i // RUN_COLS, i % RUN_COLS])
        ax.set_title(name, fontsize=10, loc="left")
        ax.grid(True, color="0.9", lw=0.6)
        draw[name](ax)
        if name != "kNN top-1":
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))  # steps are whole numbers
            ax.xaxis.set_major_formatter(FuncFormatter(_steps_label))
            ax.set_xlabel("step")
    return _save(fig, Path(out) if out else run_dir / CURVES_PNG, title, panels)


def _steps_label(value: float, _pos: Any = None) -> str:
    """150000 -> '150k' (six-digit step labels otherwise run into each other)."""
    return f"{value / 1000:g}k" if abs(value) >= 10000 else f"{value:g}"


def _grid(fig, rows: int, cols: int, left: float, right: float, top: float, bottom: float,
          wgap: float, hgap: float):
    """A GridSpec with margins and gaps in inches. Fixed margins instead of matplotlib's
    constrained layout, which measured 0.6 s of a 1.3 s curves picture (3,000 rows, 2 cores)."""
    w, h = fig.get_size_inches()
    aw = (w - left - right - (cols - 1) * wgap) / cols  # one panel's width, inches
    ah = (h - top - bottom - (rows - 1) * hgap) / rows
    return fig.add_gridspec(rows, cols, left=left / w, right=1 - right / w, bottom=bottom / h,
                            top=1 - top / h, wspace=wgap / aw, hspace=hgap / ah if rows > 1 else 0.0)


def _save(fig, out: Path, title: str, panels: Sequence[str]) -> Path:
    """Written to a temporary name, then renamed: a viewer never reads half a PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=DPI,
                metadata={"Title": title, "Panels": ", ".join(panels), "Software": "fast_ressl"})
    os.replace(tmp, out)
    return out


def plot_after_run(run_dir: os.PathLike | str, say: Callable[[str], None]) -> Optional[Path]:
    """The end of a run (rank 0): draw the curves and say where. Never fails the run: its
    checkpoint and summary are already written, so a missing matplotlib is one info line, and so
    is any other error of the picture."""
    try:
        path = plot_run(run_dir)
    except PlotUnavailable:
        say(f"curves: not drawn (matplotlib is not installed: {INSTALL_HINT})")
        return None
    except Exception as e:  # noqa: BLE001 - a picture must never turn a finished run into a failure
        say(f"curves: not drawn ({type(e).__name__}: {e})")
        return None
    say(f"curves: {path}")
    return path


# ----------------------------------------------------------------------------- benchmark bars
def bench_panels(report: Dict[str, Any]) -> List[str]:
    """The modes of a bench report with at least one measured result, in the report's order."""
    modes = report.get("settings", {}).get("modes") or []
    return [m for m in modes if any("median" in r.get("results", {}).get(m, {}) for r in report["runs"])]


def bench_bars(report: Dict[str, Any], modes: List[str]) -> int:
    """The most bars (measured variants) in one of these modes' panels."""
    return max(sum("median" in r.get("results", {}).get(m, {}) for r in report["runs"]) for m in modes)


def _short_override(item: str) -> str:
    """"data.num_threads=4" -> "num_threads=4" (a bar label; the JSON keeps the full key)."""
    key, sep, value = item.partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}" if sep else item


def _variant_color(name: str, k: int) -> str:
    if name == "reference":
        return "0.6"
    if name == "fast":
        return "tab:blue"
    return ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")[k % 6]


def plot_bench(report: Dict[str, Any], out_png: os.PathLike | str) -> Path:
    """Bars of images/s (median, min-max whiskers) per variant, one panel per mode, with the
    speed-up over the reference of the same run written on each bar; returns the PNG's path."""
    modes = bench_panels(report)
    if not modes:
        raise PlotError("the bench report has no measured results to draw")
    Figure, FigureCanvasAgg = _matplotlib()
    w, h = figure_size_px(len(modes), kind="bench", bars=bench_bars(report, modes))
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = _grid(fig, 1, len(modes), left=0.75, right=0.15, top=TITLE_IN + 0.35, bottom=0.6, wgap=0.9,
                 hgap=0.0)
    m, v = report.get("machine", {}), report.get("versions", {})
    gpu = (m.get("gpu") or {}).get("name", "no GPU") if isinstance(m.get("gpu"), dict) else "no GPU"
    title = (f"fast-ressl bench: {m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpu_count', '?')} "
             f"cores, {gpu}; torch {v.get('torch', '?')}")
    fig.suptitle(title + "\nsource images/s (median; whiskers min-max), speed-up vs reference of the same run",
                 fontsize=10)
    ratios = report.get("ratios", {})
    for i, mode in enumerate(modes):
        ax = fig.add_subplot(grid[0, i])
        names, heights, lo, hi, colors, notes = [], [], [], [], [], []
        k = 0
        for run in report["runs"]:
            res = run.get("results", {}).get(mode)
            if not res or "median" not in res:
                continue
            name = run["variant"]
            precision = ((run.get("config") or {}).get("train") or {}).get("precision")
            label = "\n".join(_short_override(o) for o in name.split(" "))  # a sweep point: one per line
            names.append(f"{label}\n{precision}" if precision else label)
            heights.append(res["median"])
            lo.append(res["median"] - res.get("min", res["median"]))
            hi.append(res.get("max", res["median"]) - res["median"])
            colors.append(_variant_color(name, k))
            k += name not in ("fast", "reference")
            ratio = 1.0 if name == "reference" else ratios.get(name, {}).get(mode)
            notes.append(f"{res['median']:.0f}/s" + (f"\n{ratio:.2f}x" if ratio else ""))
        x = list(range(len(names)))
        bars = ax.bar(x, heights, color=colors, width=0.65)
        ax.errorbar(x, heights, yerr=[lo, hi], fmt="none", ecolor="0.2", capsize=4, lw=1)
        top = max(hv + up for hv, up in zip(heights, hi))
        ax.set_ylim(0, top * 1.25)  # room for the labels above the whiskers
        for bar, note, up in zip(bars, notes, hi):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + up + top * 0.02, note,
                    ha="center", va="bottom", fontsize=9, fontweight="bold")
        ax.set_xticks(x, names, fontsize=8 if any("=" in n for n in names) else 9)
        ax.set_title(mode, fontsize=11)
        ax.set_ylabel("source images/s")
        ax.grid(True, axis="y", color="0.9", lw=0.6)
        ax.set_axisbelow(True)
    return _save(fig, Path(out_png), title, modes)

