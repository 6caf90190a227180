"""`fast-ressl bench CONFIG [key=value ...]`: throughput of the loader, the training step and the
real loop, for the fast path and the original ReSSL way of running, side by side in one run.

Modes
  loader  the data pipeline alone (both views delivered on the target device): source images/s.
  step    the training step alone, on synthetic tensors of the run's shapes: images/s, peak memory,
          achieved TFLOP/s from the backbone's FLOP count.
  e2e     the real loop with the configured loader: images/s and the data-wait fraction (host time
          blocked on the next batch / wall time of the timed steps).

Variants
  fast        the config as given (defaults <- recipe <- overrides).
  reference   what the original ReSSL code does: torchvision DataLoader + PIL augmentations
              (data.loader=torch), fp32 data and compute, NCHW, eager (no torch.compile anywhere),
              non-fused SGD, and a Python loop over parameters for the EMA (`reference_ema_`).
  no_<x>      ablations (--ablate): the fast config with one switch off: channels_last, compile,
              fused (optimizer), amp (fp32 compute).

Honest timing: `step` and `e2e` run the training loop of `fast_ressl/train.py` itself (`run_loop`, with
the models, optimizer and loss built by the same helpers); warm-up steps (compilation, cudnn
autotuning, allocator growth, loader start-up) run first and are excluded; each repeat is one
`run_loop` call of --iters steps, timed with CUDA events on a GPU (perf_counter on CPU; the loop's
closing host sync ends the region either way). Median, min, max and spread of the repeats are
reported with every sample. Checkpoint writes are switched off inside the benchmark (they are I/O,
not step time). Peak memory: CUDA max_memory_allocated over the timed repeats; on CPU the process's
max RSS so far (a high-water mark: it never goes down within one process).

FLOPs: torch's FlopCounterMode on one backbone forward per view size (projector excluded);
per source image = 3 x F(strong view) per strong view (student forward + backward) + F(weak view)
(teacher forward).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from .config import Config, load_config, to_dict

SCHEMA = "fast_ressl.bench/1"
MODES = ("loader", "step", "e2e")

# The original ReSSL code's way of running, as config overrides (+ the Python-loop EMA).
REFERENCE_OVERRIDES = ["data.loader=torch", "data.dtype=fp32", "train.precision=fp32",
                       "train.channels_last=false", "method.compile_loss=false", "model.compile=false",
                       "optim.fused=false"]
ABLATIONS = {
    "channels_last": ["train.channels_last=false"],
    "compile": ["model.compile=false", "method.compile_loss=false"],
    "fused": ["optim.fused=false"],
    "amp": ["train.precision=fp32"],
}
# Keys the benchmark sets itself: one host sync per timed repeat, no checkpoints in the way.
_BENCH_OVERRIDES = ["train.log_every=1000000000", "train.ckpt_every=1000000000"]


@dataclass
class Variant:
    name: str
    overrides: List[str]
    ema: str = "foreach"  # foreach (model.ema_update_) | python-loop (reference_ema_)


@dataclass
class BenchSettings:
    modes: Sequence[str] = MODES
    variants: Sequence[str] = ("fast", "reference")
    ablate: Sequence[str] = ()
    warmup: int = 3
    iters: int = 10
    repeats: int = 5
    data: Optional[str] = None  # a JPEG class-folder root for loader/e2e (sets data.source=folder)
    out: Optional[str] = "bench.json"
    extra: Dict[str, Any] = field(default_factory=dict)


def reference_ema_(teacher_params: List[torch.Tensor], student_params: List[torch.Tensor], m: float,
                   enabled: Optional[torch.Tensor] = None) -> None:
    """The original ReSSL momentum update: a Python loop, new tensors per parameter and step
    (`param_k.data = param_k.data * m + param_q.data * (1. - m)`). `enabled` (the loop's device-side
    "loss was finite" flag, when it passes one) keeps the teacher unchanged without a host sync."""
    import torch

    if enabled is not None:
        m = torch.where(enabled, torch.full((), m, device=enabled.device), torch.ones((), device=enabled.device))
    with torch.no_grad():
        for t, s in zip(teacher_params, student_params):
            t.data = t.data * m + s.data * (1.0 - m)


def variants_for(settings: BenchSettings) -> List[Variant]:
    out = []
    for name in settings.variants:
        if name == "fast":
            out.append(Variant("fast", []))
        elif name == "reference":
            out.append(Variant("reference", list(REFERENCE_OVERRIDES), ema="python-loop"))
        else:
            raise ValueError(f"unknown preset {name!r} (fast | reference)")
    for name in settings.ablate:
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r} (one of {', '.join(ABLATIONS)})")
        out.append(Variant(f"no_{name}", list(ABLATIONS[name])))
    return out


# ----------------------------------------------------------------------------- measuring helpers
def summarize(samples: List[float]) -> Dict[str, Any]:
    med = statistics.median(samples)
    return {"median": med, "min": min(samples), "max": max(samples),
            "spread_pct": 100.0 * (max(samples) - min(samples)) / med if med else 0.0,
            "samples": samples}


class _Timer:
    """Wall time of a region: CUDA events on a GPU, perf_counter otherwise."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


class _TimedLoader:
    """Wraps a loader: one persistent iterator, host time spent waiting in next() accumulated."""

    def __init__(self, loader: Any):
        self.loader = loader
        self.steps_per_epoch = loader.steps_per_epoch
        self._it = iter(loader)
        self.wait_s = 0.0

    def __iter__(self) -> Iterator[Any]:
        while True:
            t0 = time.perf_counter()
            batch = next(self._it)
            self.wait_s += time.perf_counter() - t0
            yield batch

    def state_dict(self) -> dict:  # checkpoints are off in the benchmark; keep this cheap
        return {}

    def load_state_dict(self, state: dict) -> None:  # pragma: no cover - never resumed
        pass


def _peak_memory_mb(device: torch.device) -> Dict[str, Any]:
    import torch

    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_memory_kind": "cuda max_memory_allocated (timed repeats)"}
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "process max RSS so far (high-water mark)"}


def backbone_flops(backbone: torch.nn.Module, size: int) -> int:
    """FLOPs (2 x MACs) of one forward of `backbone` on one 3 x size x size image (CPU, fp32)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(backbone).to("cpu", torch.float32, memory_format=torch.contiguous_format).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        m(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def flops_per_image(cfg: Config, backbone: torch.nn.Module) -> int:
    sizes = {v.size for v in cfg.data.strong} | {cfg.data.weak.size}
    f = {s: backbone_flops(backbone, s) for s in sizes}
    return sum(3 * f[v.size] for v in cfg.data.strong) + f[cfg.data.weak.size]


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- modes
def bench_loader(cfg: Config, s: BenchSettings) -> Dict[str, Any]:
    """Source images/s of the configured loader, both views moved to the target device."""
    from .data import build_loader
    from .train import build_env

    env = build_env(cfg)
    dev = env.device
    loader = build_loader(cfg, 0, 1, dev)
    it = iter(loader)
    batch_size = cfg.train.batch_size

    def fetch():
        b = next(it)
        return [x.to(dev, non_blocking=True) for x in (b.x_weak, *b.x_strong)]

    for _ in range(s.warmup):
        fetch()
    _sync(dev)
    rates = []
    for _ in range(s.repeats):
        with _Timer(dev) as t:
            for _ in range(s.iters):
                out = fetch()
        rates.append(s.iters * batch_size / t.seconds)
        del out
    del it, loader
    return {"unit": "source images/s", **summarize(rates), "batch_size": batch_size,
            "loader": cfg.data.loader, "device": str(dev)}


def bench_train(cfg: Config, s: BenchSettings, variant: Variant, mode: str) -> Dict[str, Any]:
    """`step` (synthetic source) or `e2e` (configured loader): the real `run_loop` of train.py."""
    import torch
    from . import train as T
    from .data import SyntheticSource, build_loader
    from .model import build_student_teacher
    from .optim import build_optimizer
    from .ressl import Queue

    env = T.build_env(cfg)
    dev = env.device
    student, teacher = build_student_teacher(cfg.model, dev, cfg.train.channels_last)
    fpi = flops_per_image(cfg, student.backbone)
    bn_policy = T.teacher_bn_policy(cfg, env)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    queue = Queue(cfg.method.queue_size, cfg.model.proj_dim, dev, generator=gen)
    loader = build_loader(cfg, env.rank, env.world_size, dev)
    if isinstance(loader, SyntheticSource) and not cfg.train.channels_last:
        # the reference gets NCHW tensors from its DataLoader: no per-step layout copy
        for b in loader.pool:
            b.x_weak = b.x_weak.contiguous()
            b.x_strong = [x.contiguous() for x in b.x_strong]
    timed = _TimedLoader(loader)
    base_lr = cfg.optim.lr * cfg.train.batch_size / 256
    optimizer, optim_desc = build_optimizer(student, cfg.optim, base_lr, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=cfg.train.precision == "fp16")
    state = T.State(student, teacher, queue, optimizer, scaler, timed)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = max(cfg.train.epochs * steps_per_epoch, s.warmup + s.iters * s.repeats + 1)
    batch_size = cfg.train.batch_size
    ema_fn = reference_ema_ if variant.ema == "python-loop" else None
    with tempfile.TemporaryDirectory(prefix="fast-ressl-bench-") as tmp:
        meter = T._Meter(cfg, env, Path(tmp), total_steps, steps_per_epoch, 0, live=False)
        meter.display.enabled = False  # the benchmark prints its own table, not per-step log lines
        loss_fn = T.build_loss_fn(cfg)

        def loop(n: int) -> None:  # train.py's own loop, n steps, no checkpoint I/O
            T.run_loop(cfg, env, state, loss_fn, bn_policy, steps_per_epoch, total_steps, state.step + n,
                       base_lr, None, meter, types.SimpleNamespace(signum=0),
                       **({"ema_fn": ema_fn} if ema_fn else {}))

        try:
            loop(max(1, s.warmup))  # compile, autotune, loader start-up: not timed
            _sync(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            rates, waits = [], []
            for _ in range(s.repeats):
                timed.wait_s = 0.0
                with _Timer(dev) as t:
                    loop(s.iters)
                rates.append(s.iters * batch_size / t.seconds)
                waits.append(min(1.0, timed.wait_s / t.seconds))
        finally:
            meter.close()
    res = {"unit": "source images/s", **summarize(rates), "batch_size": batch_size,
           "flops_per_image": fpi, "tflops": statistics.median(rates) * fpi / 1e12,
           **_peak_memory_mb(dev), "optimizer": optim_desc, "ema": variant.ema, "device": str(dev)}
    if mode == "e2e":
        res["loader"] = cfg.data.loader
        res["data_wait_fraction"] = summarize(waits)
    return res


# ----------------------------------------------------------------------------- run + report
def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> Dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "hostname": platform.node(), "gpu": None,
            "loadavg_start": _loadavg()}  # other processes competing for the CPU make timings noisy
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1),
                       "count": torch.cuda.device_count()}
    return info


def versions() -> Dict[str, Optional[str]]:
    import torch

    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                     "cuda": torch.version.cuda, "cudnn": None}
    if torch.backends.cudnn.is_available():
        out["cudnn"] = str(torch.backends.cudnn.version())
    for mod, key in (("torchvision", "torchvision"), ("timm", "timm"), ("nvidia.dali", "dali"),
                     ("PIL", "pillow"), ("fast_ressl", "fast_ressl")):
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[key] = getattr(m, "__version__", "unknown")
        except Exception:  # noqa: BLE001 - a missing optional package is just "not installed"
            out[key] = None
    return out


def _cfg_for(config: Optional[str], overrides: List[str], variant: Variant, mode: str,
             s: BenchSettings) -> Config:
    extra = []
    if mode == "step":
        extra.append("data.source=synthetic")
    elif s.data is not None:
        extra += ["data.source=folder", f"data.root={s.data}"]
    return load_config(config, [*overrides, *variant.overrides, *_BENCH_OVERRIDES, *extra])


def run_bench(config: Optional[str], overrides: List[str], s: BenchSettings,
              argv: Optional[List[str]] = None, console=None) -> Dict[str, Any]:
    """Measure every (variant, mode); returns (and writes to s.out) the JSON report."""
    import torch

    for mode in s.modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    variants = variants_for(s)
    report: Dict[str, Any] = {
        "schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": argv if argv is not None else sys.argv, "machine": machine_info(),
        "versions": versions(),
        "settings": {"modes": list(s.modes), "warmup": s.warmup, "iters": s.iters, "repeats": s.repeats,
                     "data": s.data, "config_file": config, "overrides": list(overrides),
                     "torch_threads": torch.get_num_threads()},
        "runs": [], "ratios": {},
    }
    for v in variants:
        run: Dict[str, Any] = {"variant": v.name, "overrides": v.overrides, "ema": v.ema,
                               "config": None, "results": {}}
        for mode in s.modes:
            cfg = _cfg_for(config, overrides, v, mode, s)
            if mode != "step" and cfg.data.source == "synthetic":
                run["results"][mode] = {"skipped": "data.source=synthetic: pass --data DIR "
                                                   "(see `fast-ressl make-bench-data`)"}
                continue
            if run["config"] is None or mode != "step":
                run["config"] = to_dict(cfg)  # the resolved config (of the loader modes if any)
            _say(console, f"[bold]{v.name}[/] {mode} ...")
            res = bench_loader(cfg, s) if mode == "loader" else bench_train(cfg, s, v, mode)
            run["results"][mode] = res
            _say(console, f"  {v.name} {mode}: {res['median']:.1f} {res['unit']} "
                          f"(spread {res['spread_pct']:.0f}%)")
        report["runs"].append(run)
    report["ratios"] = _ratios(report["runs"])
    report["machine"]["loadavg_end"] = _loadavg()
    if s.out:
        Path(s.out).parent.mkdir(parents=True, exist_ok=True)
        Path(s.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _ratios(runs: List[dict]) -> Dict[str, Dict[str, float]]:
    """median(variant) / median(reference) per mode, for every variant that has the mode."""
    by = {r["variant"]: r["results"] for r in runs}
    ref = by.get("reference")
    out: Dict[str, Dict[str, float]] = {}
    if not ref:
        return out
    for name, results in by.items():
        if name == "reference":
            continue
        for mode, res in results.items():
            base = ref.get(mode, {})
            if "median" in res and base.get("median"):
                out.setdefault(name, {})[mode] = res["median"] / base["median"]
    return out


def _say(console, msg: str) -> None:
    if console is not None:
        console.print(msg, highlight=False)


def render_table(report: Dict[str, Any], console) -> None:
    from rich.table import Table

    m, vers = report["machine"], report["versions"]
    gpu = m["gpu"]["name"] if m.get("gpu") else "no GPU"
    title = (f"fast-ressl bench: {m.get('cpu_model', m['processor'])}, {m['cpu_count']} cores, {gpu}; "
             f"torch {vers['torch']}, DALI {vers.get('dali')}")
    table = Table(title=title, title_justify="left")
    for col, just in (("mode", "left"), ("variant", "left"), ("images/s (median)", "right"),
                      ("min-max", "right"), ("spread", "right"), ("vs reference", "right"),
                      ("details", "left")):
        table.add_column(col, justify=just)
    ratios = report["ratios"]
    for mode in report["settings"]["modes"]:
        for run in report["runs"]:
            res = run["results"].get(mode)
            if res is None:
                continue
            table.add_row(*result_cells(mode, run["variant"], res, ratios))
    console.print(table)



def result_cells(mode: str, variant: str, res: Dict[str, Any], ratios: Dict[str, Any]) -> List[str]:
    """One result's row: mode, variant, median, min-max, spread, ratio to the reference, details.
    The console table and benchmarks/render_results.py (RESULTS.md) both use it."""
    if "skipped" in res:
        return [mode, variant, "-", "-", "-", "-", res["skipped"]]
    ratio = ratios.get(variant, {}).get(mode)
    details = []
    if "tflops" in res:
        details.append(f"{res['tflops'] * 1000:.1f} GFLOP/s achieved")
    if "data_wait_fraction" in res:
        details.append(f"data wait {100 * res['data_wait_fraction']['median']:.1f}%")
    if "peak_memory_mb" in res:
        details.append(f"max RSS {res['peak_memory_mb']:.0f} MB" if "RSS" in res.get("peak_memory_kind", "")
                       else f"peak {res['peak_memory_mb']:.0f} MB")
    if "loader" in res:
        details.append(f"loader {res['loader']}")
    return [mode, variant, f"{res['median']:.1f}", f"{res['min']:.1f}-{res['max']:.1f}",
            f"{res['spread_pct']:.0f}%",
            "1.00x" if variant == "reference" else (f"{ratio:.2f}x" if ratio else "-"), ", ".join(details)]

# ----------------------------------------------------------------------------- CLI
def _split_list(text: str) -> List[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def cmd_bench(args) -> int:
    from .log import console

    overrides, variants = [], _split_list(args.presets)
    for item in args.overrides:
        if item.startswith("preset="):
            value = item.split("=", 1)[1]
            variants = ["fast", "reference"] if value in ("both", "all") else _split_list(value)
        else:
            overrides.append(item)
    ablate = list(ABLATIONS) if args.ablate == "all" else _split_list(args.ablate or "")
    s = BenchSettings(modes=_split_list(args.modes), variants=variants, ablate=ablate,
                      warmup=args.warmup, iters=args.iters, repeats=args.repeats, data=args.data,
                      out=args.out)
    config = None if args.config in ("-", "defaults") else args.config
    report = run_bench(config, overrides, s, argv=["fast-ressl", "bench", *sys.argv[2:]]
                       if sys.argv[1:2] == ["bench"] else None, console=console)
    render_table(report, console)
    if s.out:
        console.print(f"wrote {s.out}", highlight=False)
    return 0


def add_cli_command(sub) -> None:
    p = sub.add_parser("bench", help="throughput: loader / step / e2e, fast path vs the reference",
                       description="Measure loader, training-step and end-to-end throughput of CONFIG "
                       "(plus dotted overrides) and of the original ReSSL way of running "
                       "(preset=reference) side by side; prints a table and writes a JSON report. "
                       "preset=fast|reference|both picks the variants (default both).")
    p.add_argument("config", help="YAML recipe, or '-' for the defaults")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides; preset=fast|reference|both")
    p.add_argument("--modes", default="loader,step,e2e", help="comma list of loader, step, e2e")
    p.add_argument("--presets", default="fast,reference", help="comma list of fast, reference")
    p.add_argument("--ablate", default="",
                   help="comma list of channels_last, compile, fused, amp (or 'all'): the fast "
                   "config with that one switch off")
    p.add_argument("--data", default=None, help="JPEG class-folder root for loader/e2e "
                   "(sets data.source=folder data.root=DIR)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps/batches first (default 3)")
    p.add_argument("--iters", type=int, default=10, help="steps/batches per timed repeat (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    p.add_argument("--out", default="bench.json", help="JSON report path (default bench.json)")
    p.set_defaults(func=cmd_bench)
