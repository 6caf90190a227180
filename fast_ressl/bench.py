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
              Its step waits for the GPU once (the non-finite guard's `bool(ok)`: non-fused SGD
              cannot skip an update on the device), as MoCo-family loops (MoCo's main_moco.py,
              whose shuffle-BN the ReSSL reference uses) wait once for their per-step
              `losses.update(loss.item(), ...)`; the original's own loop was not read here.
  no_<x>      ablations (--ablate): the fast config with one switch off: channels_last, compile,
              fused (optimizer), amp (fp32 compute), augment (the student view's colour jitter,
              grayscale, blur and solarize: decode + crops only; loader and e2e modes).
  KEY=V ...   sweep points (--sweep KEY=V1,V2,... once per key): the fast config with every
              combination of the swept values, named by its overrides; the report's `sweep` names
              the fastest point per mode. For tuning in one process (DALI threads, hw_decoder_load,
              prefetch depth, compile), e.g. `--presets fast --modes loader --sweep
              data.num_threads=4,8,12 --sweep data.hw_decoder_load=0,0.65,0.9`.

Honest timing: `step` and `e2e` run the training loop of `fast_ressl/train.py` itself: one
`train.Loop` per (variant, mode), built with the models, optimizer and loss of the same helpers and
set up outside the timer (buffer clones, torch.compile and DDP wrapping happen in Loop.__init__).
Warm-up steps (compilation, cudnn autotuning, allocator growth, loader start-up incl. its first
pipeline build) run first and are excluded; each repeat is one `loop.run(step + --iters)`, timed
with CUDA events on a GPU (perf_counter on CPU). The window's last step logs as training does at
its log interval: one host sync and one metrics.jsonl line per window, nothing else written
(checkpoints, TensorBoard and the kNN monitor are off). Median, min, max and spread of the repeats
are reported with every sample.

Epoch boundaries: a small benchmark set crosses epochs far more often than ImageNet does; the
report counts the boundaries inside the timed windows (`epoch_boundaries_timed`). The DALI loader
builds the next epoch's pipeline ahead on a side thread, as in training; `pipeline_builds_timed`
lists the builds started inside the timed windows and `ahead_wait_s` how long a batch waited for
one; a synchronous build there (`sync_builds_timed` > 0) would be a cost training does not pay.

Backend flags: every (variant, mode) runs with the flags saved before it and restored after it, so
variant order cannot change results. The fast path runs with the run's flags (`train.configure_backends`:
cuDNN TF32 and benchmark on CUDA, cuBLAS TF32 off); the reference with torch's defaults
(TORCH_DEFAULT_BACKENDS). The flags in force during the timed windows are in the report.

Memory: on a GPU, torch's max_memory_allocated over the timed repeats (`peak_memory_mb`) and,
separately, the device memory the measurement added outside torch's allocator (`outside_torch_mb`:
DALI's device pool and nvJPEG state, which DALI 2.4 offers no call to query, plus kernel images that
CUDA loads on first use; DALI's unused pool is released before each measurement so that each starts
from an empty pool) and the process's RSS growth (`host_rss_growth_mb`, DALI's pinned host pool is
part of it). On CPU the process's max RSS so far (a high-water mark: it never goes down within one
process).

Host CPU (every mode, over the timed repeats, `host_cpu`): the cores kept busy by the thread that
runs the loop, by this process (DALI's threads included) and by the whole machine (/proc/stat:
DataLoader workers included). Where the step shares the machine with the loader, this says whether
the CPU is what they share.

Device timeline (e2e on a GPU, after the timed repeats, `gpu_timeline`): three steps under
torch.profiler, split by stream: the streams torch's ops launch on (the step) against the rest (the
loader's own streams); per step, the step's kernel time (compare with the step alone's
`time_breakdown.kernel_ms_per_step`), the loader's, how much of them overlap, how long the step's
streams idle while only the loader's work runs, and how long the GPU idles (`breakdown.device_timeline`).

Ops per step (step and e2e, measured after the timed repeats, never inside them):
`opcount.step_op_counts` profiles ordinary steps of the same Loop: the top-level aten ops a step
issues, those of the networks alone, and the difference (`bookkeeping_ops`, by op in
`bookkeeping_by_op`). On a GPU each op is at least one kernel launch the host must issue.

Where the time goes (step mode, after the op count): `breakdown.step_breakdown` times the networks
alone (student forward + backward, teacher forward) against the measured step, and profiles two
steps: the device's busy fraction on a GPU (their kernel time per step over the timed step time:
launch-bound vs compute-bound) and the top ops by self time (`time_breakdown` in the JSON).

FLOPs: torch's FlopCounterMode on one backbone forward per view size (projector excluded);
per source image = 3 x F(strong view) per strong view (student forward + backward) + F(weak view)
(teacher forward).
"""
from __future__ import annotations

import copy
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from .config import Config, ConfigError, load_config, to_dict

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
    # the student view's colour jitter, grayscale, blur and solarize off: the loader then decodes and
    # makes both crops (flip, normalise) only. Against the full loader it says whether the data side
    # is decoder- or augmentation-bound; the networks see other pixels, not another amount of work,
    # so step mode (synthetic tensors) does not run it.
    "augment": ["data.augment.jitter_p=0", "data.augment.grayscale_p=0", "data.augment.blur_p=0",
                "data.augment.solarize_p=0"],
}
# Ablations that change nothing step mode measures (it trains on synthetic tensors).
_DATA_ONLY_ABLATIONS = {"augment"}
# Keys the benchmark sets itself: one host sync per timed repeat (its last step logs), no checkpoints
# and no kNN monitor at epoch boundaries in the way.
_BENCH_OVERRIDES = ["train.log_every=1000000000", "train.ckpt_every=1000000000", "eval.knn_every_epochs=0",
                    "eval.knn_compare_random=false"]
# torch's own defaults for the flags train.configure_backends sets: the reference runs with these.
TORCH_DEFAULT_BACKENDS = {"cudnn.benchmark": False, "cudnn.allow_tf32": True, "cuda.matmul.allow_tf32": False}
# Steps opcount.step_op_counts advances the loop by (+1 batch it reads for the networks-alone passes),
# and breakdown.step_breakdown (step mode) likewise.
_OPCOUNT_STEPS = 3
_BREAKDOWN_STEPS = 3
# Steps breakdown.e2e_timeline profiles in e2e mode on a GPU (in place of the step breakdown).
_TIMELINE_STEPS = 3


@dataclass
class Variant:
    name: str
    overrides: List[str]
    ema: str = "foreach"  # foreach (model.ema_update_) | python-loop (reference_ema_)
    backends: str = "run"  # run (train.configure_backends) | torch-defaults (TORCH_DEFAULT_BACKENDS)


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
    sweep: Sequence[tuple] = ()  # ((key, (value, ...)), ...): a grid of fast-config variants


def parse_sweep(items: Sequence[str]) -> List[tuple]:
    """['data.num_threads=4,8', 'model.compile=false,true'] -> [(key, (values...)), ...]. Values are
    split on commas outside brackets and braces (`data.strong=[{size: 160}],[{size: 224}]`). An
    unknown key fails later, in load_config, with its name."""
    out, seen = [], set()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,... (a dotted config key)")
        values, depth, cur = [], 0, ""
        for ch in text:
            if ch in "[{":
                depth += 1
            elif ch in "]}":
                depth -= 1
            if ch == "," and depth == 0:
                values.append(cur.strip())
                cur = ""
            else:
                cur += ch
        values.append(cur.strip())
        if any(v == "" for v in values):
            raise ConfigError(f"--sweep {item!r}: an empty value")
        if key in seen:
            raise ConfigError(f"--sweep: {key} is swept twice")
        seen.add(key)
        out.append((key, tuple(values)))
    return out


def sweep_variants(sweep: Sequence[tuple]) -> List[Variant]:
    """The grid's points (the last key varies fastest), each the fast config plus its overrides."""
    import itertools

    if not sweep:
        return []
    keys = [k for k, _ in sweep]
    out = []
    for combo in itertools.product(*(vals for _, vals in sweep)):
        over = [f"{k}={v}" for k, v in zip(keys, combo)]
        out.append(Variant(" ".join(over), over))
    return out


def sweep_best(runs: List[dict], sweep: Sequence[tuple], fast: Optional[str] = "fast") -> Dict[str, Any]:
    """Per mode: the sweep point with the highest median images/s, and how it compares with the
    slowest point and with the plain fast config (the run named `fast`: the fast preset, or the
    sweep point that is the fast config itself when the preset did not run; None: neither)."""
    names = {v.name for v in sweep_variants(sweep)}
    best: Dict[str, Any] = {}
    modes = {m for r in runs for m in r["results"]}
    for mode in sorted(modes):
        pts = [(r["results"][mode]["median"], r["variant"]) for r in runs
               if r["variant"] in names and "median" in r["results"].get(mode, {})]
        if not pts:
            continue
        (top, name), (low, _) = max(pts), min(pts)
        entry = {"variant": name, "median": top, "vs_slowest": top / low if low else None}
        base = next((r["results"][mode] for r in runs if r["variant"] == fast
                     and "median" in r["results"].get(mode, {})), None)
        if base:
            entry["vs_fast"] = top / base["median"]
        best[mode] = entry
    return {"keys": [[k, list(v)] for k, v in sweep], "best": best, "fast": fast}


def reference_ema_(teacher_params: List[torch.Tensor], student_params: List[torch.Tensor], m: float,
                   enabled: Optional[torch.Tensor] = None) -> None:
    """The original ReSSL momentum update: a Python loop, new tensors per parameter and step
    (`param_k.data = param_k.data * m + param_q.data * (1. - m)`: 3 ops per parameter, m a Python
    float). `enabled` (the loop's device-side "loss was finite" flag, when it passes one) keeps the
    teacher unchanged without a host sync: m becomes a device tensor, and its 1 - m is taken once
    per step, not per parameter (that was one op per parameter more than the original issues:
    an rsub per parameter, 163 in the reference ResNet-50 step; found in review)."""
    import torch

    w = 1.0 - m
    if enabled is not None:
        m = torch.where(enabled, torch.full((), m, device=enabled.device), torch.ones((), device=enabled.device))
        w = 1.0 - m
    with torch.no_grad():
        for t, s in zip(teacher_params, student_params):
            t.data = t.data * m + s.data * w


def variants_for(settings: BenchSettings) -> List[Variant]:
    out = []
    for name in settings.variants:
        if name == "fast":
            out.append(Variant("fast", []))
        elif name == "reference":
            out.append(Variant("reference", list(REFERENCE_OVERRIDES), ema="python-loop",
                               backends="torch-defaults"))
        else:
            raise ConfigError(f"--presets: unknown preset {name!r} (fast | reference)")
    for name in settings.ablate:
        if name not in ABLATIONS:
            raise ConfigError(f"--ablate: unknown ablation {name!r} (one of {', '.join(ABLATIONS)})")
        out.append(Variant(f"no_{name}", list(ABLATIONS[name])))
    return out + sweep_variants(settings.sweep)


# ----------------------------------------------------------------------------- measuring helpers
def pooled_rate(rates: List[float]) -> float:
    """Images/s of windows of equal image counts taken together (all their images over all their
    time: the harmonic mean). A loader that delivers in bursts (the reference's DataLoader workers)
    makes single windows read far off in both directions; on the first H200 run its three loader
    windows read 897, 1,574 and 44,206 images/s, pooled 1,692."""
    return len(rates) / sum(1.0 / r for r in rates) if rates and all(r > 0 for r in rates) else 0.0


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


def backend_flags() -> Dict[str, Any]:
    """The torch backend flags that change numerics or kernel choice (train.configure_backends
    sets the first three on CUDA; train.deterministic sets the deterministic-algorithms mode).
    torch.set_float32_matmul_precision is the same cuBLAS switch as cuda.matmul.allow_tf32."""
    import torch

    return {"cudnn.benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn.allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cuda.matmul.allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled()}


def set_backend_flags(flags: Dict[str, Any]) -> None:
    """Set the flags named in `flags` (keys of backend_flags()). The legacy allow_tf32 flags only,
    as train.configure_backends uses them: torch refuses to read its float32 matmul precision once
    both its legacy and its new per-backend API have set precisions."""
    import torch

    if "cudnn.benchmark" in flags:
        torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    if "cudnn.allow_tf32" in flags:
        torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    if "cuda.matmul.allow_tf32" in flags:
        torch.backends.cuda.matmul.allow_tf32 = flags["cuda.matmul.allow_tf32"]
    if "deterministic_algorithms" in flags:
        torch.use_deterministic_algorithms(flags["deterministic_algorithms"],
                                           warn_only=flags.get("deterministic_warn_only", False))


@contextmanager
def backend_flags_restored() -> Iterator[None]:
    """Whatever a measurement sets (build_env -> configure_backends, the reference's defaults),
    the next one starts from the flags in force before it."""
    saved = backend_flags()
    try:
        yield
    finally:
        set_backend_flags(saved)


def _apply_variant_backends(variant: Variant) -> None:
    """After build_env: the reference drops the run's flags for torch's defaults."""
    if variant.backends == "torch-defaults":
        set_backend_flags(TORCH_DEFAULT_BACKENDS)
    elif variant.backends != "run":
        raise ValueError(f"unknown backends {variant.backends!r} (run | torch-defaults)")


def _rss_mb() -> Optional[float]:
    """The process's current resident set (VmRSS), MiB; None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _release_dali_pools() -> None:
    """Free DALI's unused pooled memory (its pools outlive pipelines) so that the next measurement's
    `outside_torch_mb` starts from an empty pool. No-op without DALI."""
    try:
        from pipelines_dali.loader import release_unused_memory
    except ImportError:
        return
    release_unused_memory()


class _MemoryProbe:
    """On CUDA: device memory in use outside torch's caching allocator (mem_get_info's used bytes
    minus torch's reserved bytes; device-wide, so meant for a machine the benchmark has to itself)
    and the process RSS, relative to when the probe was made; `sample()` keeps the maxima. Nothing
    on CPU, where the max-RSS high-water mark is reported instead."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.outside_mb = self.rss_growth_mb = 0.0
        if self.cuda:
            gc.collect()  # the previous measurement's loader and pipelines, before DALI frees its pool
            _release_dali_pools()
            # torch's cached blocks of earlier variants back to the driver: the reserved peak (reset
            # after warm-up) would otherwise include memory cached for them (found in review)
            import torch

            torch.cuda.empty_cache()
            self.outside0, self.rss0 = self._outside_torch_mb(), _rss_mb()

    def _outside_torch_mb(self) -> float:
        import torch

        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free - torch.cuda.memory_reserved(self.device)) / 2**20

    def sample(self) -> None:
        if not self.cuda:
            return
        self.outside_mb = max(self.outside_mb, self._outside_torch_mb() - self.outside0)
        rss = _rss_mb()
        if rss is not None and self.rss0 is not None:
            self.rss_growth_mb = max(self.rss_growth_mb, rss - self.rss0)

    def report(self) -> Dict[str, Any]:
        if not self.cuda:
            return {}
        return {"outside_torch_mb": round(self.outside_mb, 1), "host_rss_growth_mb": round(self.rss_growth_mb, 1),
                "outside_torch_kind": "device memory added outside torch's allocator: DALI pools, nvJPEG, "
                                      "lazily loaded kernels (mem_get_info - memory_reserved)"}


def _machine_cpu_jiffies() -> Optional[tuple]:
    """(busy, total, CPUs) from /proc/stat (Linux; in a container, the host's): jiffies of all CPUs
    since boot, and how many CPUs its summary line adds up; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        user, nice, system, idle, iowait, irq, softirq, steal = ([int(x) for x in lines[0].split()[1:9]] + [0] * 8)[:8]
    except (OSError, ValueError, IndexError):
        return None
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    # steal (a hypervisor running someone else) is time this machine did not get: not busy here
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal, cpus


class _HostCPU:
    """Host CPU over a timed region, in cores (1.0 = one core busy all the time):
    - main_thread_cores: the thread that runs the loop (Python, op dispatch, kernel launches of the
      forward, loss and optimizer; the backward's launches run on autograd's device thread on a GPU).
      Near 1.0 where the GPU idles: the step is host-bound;
    - process_cores: every thread of this process (DALI's worker threads are in it; a torch
      DataLoader's worker processes are not), of the `cores` it may run on;
    - machine_busy_cores of machine_cores: the whole machine (/proc/stat), which does count
      DataLoader workers. Near machine_cores: the loader's threads and the step compete for the CPU.
    Why: on the first H200 run the small backbones ran end to end at 0.65-0.77x their steps alone
    beside a loader with 12 threads on 16 cores, and nothing measured the CPU."""

    def __enter__(self):
        self.wall0, self.thread0 = time.perf_counter(), time.thread_time()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.proc0 = ru.ru_utime + ru.ru_stime
        self.machine0 = _machine_cpu_jiffies()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.wall0
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.report = {"seconds": round(wall, 3),
                       "main_thread_cores": round((time.thread_time() - self.thread0) / wall, 3),
                       "process_cores": round((ru.ru_utime + ru.ru_stime - self.proc0) / wall, 3),
                       "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
        machine = _machine_cpu_jiffies()
        # /proc/stat counts 10 ms ticks: a window shorter than a few ticks has no machine figure
        if self.machine0 is not None and machine is not None and machine[1] > self.machine0[1]:
            self.report["machine_busy_cores"] = round(
                (machine[0] - self.machine0[0]) / (machine[1] - self.machine0[1]) * machine[2], 2)
            self.report["machine_cores"] = machine[2]


def synthetic_inputs_mb(loader: Any) -> float:
    """MiB of the batches a SyntheticSource keeps on the device for the whole measurement (its pool,
    cycled by step mode); 0 for a real loader."""
    from .data import SyntheticSource

    if not isinstance(loader, SyntheticSource):
        return 0.0
    tensors = [t for b in loader.pool for t in (b.x_weak, *b.x_strong, b.labels)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _peak_memory_mb(device: torch.device, inputs_mb: float = 0.0) -> Dict[str, Any]:
    """Peak memory over the timed repeats, MiB. On CUDA, step mode's synthetic input pool
    (`inputs_mb`: 4 batches, 588 MiB at batch 256, 224 px, fp16) is taken out of torch's peak: it
    is not what a training step needs (a loader's batches replace it; DALI's live outside torch, in
    outside_torch_mb), and left in it made the H200 step peaks 591 MiB above their e2e ones."""
    import torch

    if device.type == "cuda":
        out = {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 - inputs_mb,
               "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
               "peak_memory_kind": "cuda max_memory_allocated (timed repeats), MiB"}
        if inputs_mb:
            out["synthetic_inputs_mb"] = round(inputs_mb, 1)
            out["peak_memory_kind"] += ", less the synthetic input pool (synthetic_inputs_mb)"
        return out
    return {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "process max RSS so far (high-water mark), MiB"}


def epoch_boundaries(start: int, end: int, steps_per_epoch: int) -> int:
    """How many of the batches start+1 .. end (1-based, as steps count them) open a new epoch
    (batch j with (j - 1) % steps_per_epoch == 0, j > 1)."""
    return sum(1 for j in range(start + 1, end + 1) if j > 1 and (j - 1) % steps_per_epoch == 0)


def _loader_builds(loader: Any) -> Optional[List[Any]]:
    """The loader's pipeline build log (DALI: [("sync" | "ahead", epoch), ...]); None for others."""
    builds = getattr(loader, "builds", None)
    return list(builds) if builds is not None else None


def _boundary_report(loader: Any, start: int, end: int, builds_before: Optional[List[Any]],
                     wait_before: float) -> Dict[str, Any]:
    """What the timed batches start+1 .. end crossed: epoch boundaries and pipeline builds."""
    spe = loader.steps_per_epoch
    out: Dict[str, Any] = {"steps_per_epoch": spe, "epoch_boundaries_timed": epoch_boundaries(start, end, spe)}
    if builds_before is not None:
        timed = [list(b) for b in _loader_builds(loader)[len(builds_before):]]
        out["pipeline_builds_timed"] = timed
        out["sync_builds_timed"] = sum(1 for kind, _ in timed if kind == "sync")
        out["ahead_wait_s"] = round(getattr(loader, "ahead_wait_s", 0.0) - wait_before, 6)
    return out


def _close_loader(loader: Any) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


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
def loader_cadence(loader: Any, warmup: int, iters: int) -> Tuple[int, int]:
    """(warm-up batches, batches per timed window) for `loader`: the warm-up takes at least the
    batches the loader has in flight (a DataLoader's workers x prefetch: made while the first step
    compiles, they would be drained in the first timed window at no cost), and a window holds
    whole rounds of its workers (the DataLoader takes their batches in turn, and workers started
    together deliver in bursts: on the first H200 run 12 workers x prefetch 4 against 5 warm-up and
    10-batch windows read 897, 1,574 and 44,206 images/s)."""
    in_flight = int(getattr(loader, "in_flight_batches", 0) or 0)
    cycle = max(1, int(getattr(loader, "cycle_batches", 1) or 1))
    return max(warmup, in_flight), -(-iters // cycle) * cycle


def _window_seconds(seconds: float, env: Any) -> float:
    """A timed window's length as the run sees it: the slowest rank's (a training step waits for
    every rank's batch), so that N ranks report the global images/s as step and e2e do."""
    from . import dist

    return max(dist.gather_objects(seconds, env))  # over the gloo control group; [seconds] alone


def bench_loader(cfg: Config, s: BenchSettings, variant: Optional[Variant] = None) -> Dict[str, Any]:
    """Source images/s of the configured loader, both views moved to the target device. Under
    torchrun every rank reads its own shard (global batch / ranks) as in training, and the figure
    is global: the global batch over the slowest rank's window (each window starts together)."""
    from . import dist
    from .data import build_loader
    from .train import build_env

    env = build_env(cfg)
    if variant is not None:
        _apply_variant_backends(variant)
    dev = env.device
    mem = _MemoryProbe(dev)
    loader = build_loader(cfg, env.rank, env.world_size, dev)
    it = iter(loader)
    batch_size = cfg.train.batch_size

    def fetch():
        b = next(it)
        return [x.to(dev, non_blocking=True) for x in (b.x_weak, *b.x_strong)]

    # at least the first batch: the loader's start-up (first pipeline build)
    warmup, iters = loader_cadence(loader, max(1, s.warmup), s.iters)
    try:
        for _ in range(warmup):
            fetch()
        _sync(dev)
        mem.sample()
        builds, wait0 = _loader_builds(loader), getattr(loader, "ahead_wait_s", 0.0)
        rates = []
        with _HostCPU() as cpu:
            for _ in range(s.repeats):
                dist.wait_for_all(env, 600.0)
                with _Timer(dev) as t:
                    for _ in range(iters):
                        out = fetch()
                rates.append(iters * batch_size / _window_seconds(t.seconds, env))
                rank_batch = int(out[0].shape[0])  # what this rank's loader delivers per step
                del out
        mem.sample()
        boundaries = _boundary_report(loader, warmup, warmup + iters * s.repeats, builds, wait0)
        gpu = _loader_gpu_share(fetch, iters, 1000 * batch_size / statistics.median(rates)) \
            if dev.type == "cuda" else {}
    finally:
        _close_loader(loader)
    del it, loader
    return {"unit": "source images/s", **summarize(rates), "pooled": pooled_rate(rates), "batch_size": batch_size,
            "ranks": env.world_size, "rank_batch_size": rank_batch, "warmup_batches": warmup, "window_batches": iters,
            "loader": cfg.data.loader, "device": str(dev), **boundaries, **mem.report(), **gpu,
            "host_cpu": cpu.report}


def _loader_gpu_share(fetch, batches: int, batch_ms: float) -> Dict[str, Any]:
    """How much of the GPU the loader occupies at full speed: the summed duration of every kernel and
    copy on the device (DALI's decoding and augmentation, the views' copies; CUPTI sees the whole
    process) per batch over `batches` batches fetched under torch.profiler, divided by `batch_ms`,
    a batch's wall time in the timed repeats (not the profiled wall time, which holds the profiler's
    start-up: on the first H200 run ~125 ms per profile, against ~208 ms for 10 loader batches).
    Why: on that run the small backbones ran end to end at 0.65-0.77x their steps alone with the
    loader keeping up; this says whether the loader's GPU work is what the step shares. Measured
    after the timed repeats (the profiler never runs in them); a profiler that fails or records no
    device time leaves `loader_gpu_error` instead."""
    try:
        import torch

        from .breakdown import device_work_us, profiled

        def run() -> None:
            for _ in range(batches):
                fetch()

        prof, _ = profiled(run, torch.device("cuda"))
        dev_us = sum(device_work_us(ev) for ev in prof.key_averages())
    except Exception as e:  # noqa: BLE001 - a diagnostic: the throughput figures are measured already
        return {"loader_gpu_error": f"{type(e).__name__}: {e}"[:300]}
    if dev_us <= 0:  # CUPTI that did not attach (a warning, not an error): no figure, not 0%
        return {"loader_gpu_error": "the profiler recorded no device time"}
    ms = dev_us / 1000 / batches
    return {"loader_gpu_ms_per_batch": round(ms, 3),
            "loader_gpu_share": round(min(1.0, ms / batch_ms), 4) if batch_ms > 0 else None,
            "loader_gpu_kind": f"device time of all kernels and copies per batch over {batches} batches "
                               "under torch.profiler, over a batch's wall time in the timed repeats"}


def _e2e_timeline(loop: Any) -> Dict[str, Any]:
    """breakdown.e2e_timeline over _TIMELINE_STEPS steps; a profiler that fails leaves
    `timeline_error` (a diagnostic: the throughput figures are measured already)."""
    from .breakdown import e2e_timeline

    try:
        return e2e_timeline(loop, _TIMELINE_STEPS)
    except Exception as e:  # noqa: BLE001
        return {"timeline_error": f"{type(e).__name__}: {e}"[:300]}


def build_models(cfg: Config, env: Any) -> tuple:
    """(student, teacher, teacher-BN policy) as train._train makes them: the teacher is converted to
    SyncBatchNorm when the policy is 'sync' (CUDA only, train.teacher_bn_policy checks)."""
    from . import train as T
    from .model import build_student_teacher, convert_sync_bn

    student, teacher = build_student_teacher(cfg.model, env.device, cfg.train.channels_last)
    policy = T.teacher_bn_policy(cfg, env)
    if policy == "sync":
        teacher = convert_sync_bn(teacher)
    return student, teacher, policy


def bench_train(cfg: Config, s: BenchSettings, variant: Variant, mode: str) -> Dict[str, Any]:
    """`step` (synthetic source) or `e2e` (configured loader): train.py's own Loop, set up once
    outside the timer, then `loop.run` over --iters steps per timed repeat."""
    import torch
    from . import train as T
    from .breakdown import step_breakdown
    from .compiling import wants_cudagraphs
    from .data import SyntheticSource, build_loader
    from .opcount import step_op_counts
    from .optim import build_optimizer
    from .ressl import Queue

    env = T.build_env(cfg)
    _apply_variant_backends(variant)
    dev = env.device
    mem = _MemoryProbe(dev)
    student, teacher, bn_policy = build_models(cfg, env)
    fpi = flops_per_image(cfg, student.backbone)
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
    # compile, autotune, loader start-up: at least one step; with CUDA graphs three (inductor's
    # cudagraph trees run a graph eagerly once, record it on the second call, replay from the third)
    warmup, iters = loader_cadence(
        loader, max(3 if wants_cudagraphs(cfg.model.compile, cfg.model.compile_mode, dev) else 1, s.warmup), s.iters)
    total_steps = max(cfg.train.epochs * steps_per_epoch,
                      warmup + iters * s.repeats + _OPCOUNT_STEPS + max(_BREAKDOWN_STEPS, _TIMELINE_STEPS) + 2)
    batch_size = cfg.train.batch_size
    ema_fn = reference_ema_ if variant.ema == "python-loop" else None
    with tempfile.TemporaryDirectory(prefix="fast-ressl-bench-") as tmp:
        meter = T._Meter(cfg, env, Path(tmp), total_steps, steps_per_epoch, 0, live=False)
        meter.display.enabled = False  # the benchmark prints its own table, not per-step log lines
        if meter.tb is not None:  # TensorBoard event files: I/O, not step time
            meter.tb.close()
            meter.tb = None
        loop = None
        try:
            loss_fn = T.build_loss_fn(cfg, env.rank, cfg.train.batch_size // env.world_size)
            loop = T.Loop(cfg, env, state, loss_fn, bn_policy, steps_per_epoch, total_steps, base_lr, None,
                          meter, types.SimpleNamespace(signum=0), **({"ema_fn": ema_fn} if ema_fn else {}))
            loop.run(warmup)
            _sync(dev)
            mem.sample()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            flags = backend_flags()
            builds, wait0 = _loader_builds(loader), getattr(loader, "ahead_wait_s", 0.0)
            rates, waits = [], []
            with _HostCPU() as cpu:
                for _ in range(s.repeats):
                    timed.wait_s = 0.0
                    with _Timer(dev) as t:
                        loop.run(state.step + iters)
                    rates.append(iters * batch_size / t.seconds)
                    waits.append(min(1.0, timed.wait_s / t.seconds))
            mem.sample()
            peak = _peak_memory_mb(dev, synthetic_inputs_mb(loader))
            boundaries = _boundary_report(loader, warmup, state.step, builds, wait0)
            # model.compile_mode with CUDA graphs, on CUDA: the graphs inductor ran without a CUDA
            # graph up to the end of the timed repeats (0 = every one captured)
            cudagraphs = loop.cudagraph_skips.report() if loop.cudagraph_skips is not None else None
            ops = step_op_counts(loop)  # after the timed repeats: the profiler never runs in them
            if cudagraphs is not None:
                ops["cudagraphs"] = cudagraphs
            if mode == "step":  # where the step's time goes (e2e adds the data wait, reported apart)
                ops["time_breakdown"] = step_breakdown(loop, 1000 * batch_size / statistics.median(rates))
            elif dev.type == "cuda":  # e2e: the step's kernels beside the loader's
                ops["gpu_timeline"] = _e2e_timeline(loop)
        finally:
            meter.close()
            _close_loader(loader)
            if loop is not None:
                loop.close()
    teacher_sync_bn = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in teacher.modules())
    res = {"unit": "source images/s", **summarize(rates), "pooled": pooled_rate(rates), "batch_size": batch_size,
           "warmup_batches": warmup, "window_batches": iters,
           "flops_per_image": fpi, "tflops": statistics.median(rates) * fpi / 1e12,
           **peak, **mem.report(), **ops, "optimizer": optim_desc, "ema": variant.ema,
           "teacher_bn": bn_policy, "teacher_sync_bn_layers": teacher_sync_bn, "backend_flags": flags,
           "device": str(dev), **boundaries, "host_cpu": cpu.report,
           # a process group (several ranks, or one with FAST_RESSL_DDP_ONE_RANK=1): DDP's costs are in
           "process_group": torch.distributed.get_backend() if env.distributed else None}
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
    try:
        return load_config(config, [*overrides, *variant.overrides, *_BENCH_OVERRIDES, *extra])
    except ConfigError as e:
        if s.data is None and "needs data.root" in str(e):
            raise ConfigError(f"--modes {mode} reads images: pass --data DIR (a class folder, e.g. from "
                              f"`fast-ressl make-bench-data`), or data.root=... ({e})") from None
        raise


def _resolved(cfg: Config) -> Dict[str, Any]:
    """The config as a run on this machine uses it (train.precision=auto made concrete)."""
    import torch

    from .train import resolve_precision

    c = copy.deepcopy(cfg)
    cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    resolve_precision(c, torch.device("cuda" if cuda else "cpu"))
    return to_dict(c)


def run_bench(config: Optional[str], overrides: List[str], s: BenchSettings,
              argv: Optional[List[str]] = None, console=None) -> Dict[str, Any]:
    """Measure every (variant, mode); returns (and writes to s.out) the JSON report."""
    import torch

    for mode in s.modes:
        if mode not in MODES:
            raise ConfigError(f"--modes: unknown mode {mode!r} (one of {', '.join(MODES)})")
    if s.iters < 1 or s.repeats < 1 or s.warmup < 0:
        raise ConfigError(f"--iters and --repeats must be at least 1 and --warmup at least 0 "
                          f"(got {s.iters}, {s.repeats}, {s.warmup})")
    fixed = {item.split("=", 1)[0] for item in _BENCH_OVERRIDES}
    for item in overrides:  # applied after the user's, so a user's value would be replaced silently
        if item.split("=", 1)[0].strip() in fixed:
            raise ConfigError(f"override {item!r}: bench sets {item.split('=', 1)[0].strip()} itself "
                              f"({' '.join(_BENCH_OVERRIDES)}: one log step per timed window, no "
                              "checkpoints, no kNN monitor)")
    variants = variants_for(s)
    # every config loaded now: a bad key of any variant (a sweep's) fails before minutes of measuring
    cfgs = {(v.name, mode): _cfg_for(config, overrides, v, mode, s) for v in variants for mode in s.modes}
    # without the fast preset (`--presets ''`), the sweep point whose config is the fast one's stands
    # for it (vs_fast), so a grid that holds the fast config does not measure it twice
    fast_name: Optional[str] = "fast"
    if s.sweep and "fast" not in {v.name for v in variants}:
        plain = {m: to_dict(_cfg_for(config, overrides, Variant("fast", []), m, s)) for m in s.modes}
        fast_name = next((v.name for v in sweep_variants(s.sweep)
                          if all(to_dict(cfgs[(v.name, m)]) == plain[m] for m in s.modes)), None)
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
                               "backends": v.backends, "config": None, "results": {}}
        for mode in s.modes:
            cfg = cfgs[(v.name, mode)]
            if mode == "step" and v.name in {f"no_{a}" for a in _DATA_ONLY_ABLATIONS}:
                run["results"][mode] = {"skipped": "a data-side ablation: step mode trains on synthetic tensors"}
                continue
            if mode != "step" and cfg.data.source == "synthetic":
                run["results"][mode] = {"skipped": "data.source=synthetic: pass --data DIR "
                                                   "(see `fast-ressl make-bench-data`)"}
                continue
            if v.name.startswith("no_") and _resolved(cfg) == _resolved(
                    _cfg_for(config, overrides, Variant("fast", []), mode, s)):
                # e.g. no_amp on a CPU, where train.precision=auto is fp32 already: measuring it
                # again compared the fast config with itself, noise read as a difference
                run["results"][mode] = {"skipped": "the same config as fast on this machine "
                                                   f"({' '.join(v.overrides)} changes nothing here)"}
                continue
            _say(console, f"[bold]{v.name}[/] {mode} ...")
            t_mode = time.perf_counter()
            try:
                with backend_flags_restored():  # variant order cannot change another variant's flags
                    res = bench_loader(cfg, s, v) if mode == "loader" else bench_train(cfg, s, v, mode)
            except Exception as err:  # noqa: BLE001 - one failed measurement must not cost the others
                # (e.g. the reference's torch loader refused for want of /dev/shm, an out-of-memory
                # variant): recorded, said, and the bench goes on; the exit status is 1
                import traceback

                traceback.print_exc()
                res = {"error": f"{type(err).__name__}: {err}"[:1000]}
                _say(console, f"  {v.name} {mode}: FAILED ({res['error'][:200]})")
            else:
                if run["config"] is None or mode != "step":
                    # after the run: build_env resolved what depends on the device (train.precision=auto)
                    run["config"] = to_dict(cfg)  # the resolved config (of the loader modes if any)
                _say(console, f"  {v.name} {mode}: {res['median']:.1f} {res['unit']} "
                              f"(spread {res['spread_pct']:.0f}%)")
            # the measurement's whole cost (build, warm-up, repeats, op count, profile): what a GPU
            # check's time budget has to plan for (the first H200 run had no such figure)
            res["wall_s"] = round(time.perf_counter() - t_mode, 1)
            run["results"][mode] = res
            # what is measured so far, on disk: a bench killed at a time limit (a lent GPU's
            # minutes) still leaves every finished measurement
            so_far = report["runs"] + [run]
            _write_report({**report, "runs": so_far, "ratios": _ratios(so_far), "complete": False}, s.out)
        report["runs"].append(run)
    report["ratios"] = _ratios(report["runs"])
    if s.sweep:
        report["sweep"] = sweep_best(report["runs"], s.sweep, fast_name)
    report["machine"]["loadavg_end"] = _loadavg()
    report["failed"] = [f"{r['variant']} {m}" for r in report["runs"] for m, res in r["results"].items()
                        if "error" in res]
    report["complete"] = True
    _write_report(report, s.out)
    return report


def _write_report(report: Dict[str, Any], out: Optional[str]) -> None:
    """Atomically (a kill mid-write leaves the previous version, never half a JSON file)."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)


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
    for col, just in zip(RESULT_COLUMNS, RESULT_JUSTIFY):
        table.add_column(col, justify=just)
    ratios = report["ratios"]
    for mode in report["settings"]["modes"]:
        for run in report["runs"]:
            res = run["results"].get(mode)
            if res is None:
                continue
            table.add_row(*result_cells(mode, run["variant"], res, ratios))
    # not a terminal (a log file, `docker logs`, CI): rich's default 80 columns cut the headers and
    # variant names and wrapped the details one word per line (a 23-row table took 411 lines)
    if not console.is_terminal:
        from rich.console import Console

        console = Console(file=console.file, width=max(console.width, 240), highlight=False)
    console.print(table)


RESULT_COLUMNS = ("mode", "variant", "images/s (median)", "min-max", "spread", "vs reference",
                  "ops/step (bookkeeping)", "details")
RESULT_JUSTIFY = ("left", "left", "right", "right", "right", "right", "right", "left")


def ops_cell(res: Dict[str, Any]) -> str:
    """'922 (42, 4.6%)': top-level aten ops per step (bookkeeping ops around the networks, share)."""
    if "ops_per_step" not in res:
        return "-"
    return f"{res['ops_per_step']} ({res['bookkeeping_ops']}, {100 * res['bookkeeping_share']:.1f}%)"


def result_cells(mode: str, variant: str, res: Dict[str, Any], ratios: Dict[str, Any]) -> List[str]:
    """One result's row (RESULT_COLUMNS): mode, variant, median, min-max, spread, ratio to the
    reference, ops per step, details. The console table and benchmarks/render_results.py
    (RESULTS.md) both use it."""
    if "skipped" in res:
        return [mode, variant, "-", "-", "-", "-", "-", res["skipped"]]
    if "error" in res:
        return [mode, variant, "-", "-", "-", "-", "-", f"FAILED: {res['error'][:160]}"]
    ratio = ratios.get(variant, {}).get(mode)
    details = []
    # windows far apart: what they give together (from the samples in reports older than `pooled`)
    pooled = res.get("pooled") or pooled_rate(res.get("samples") or [])
    if pooled and res["spread_pct"] > 20:
        details.append(f"all windows pooled {pooled:.1f} images/s")
    if "tflops" in res:
        details.append(f"{res['tflops']:.1f} TFLOP/s achieved" if res["tflops"] >= 1
                       else f"{res['tflops'] * 1000:.1f} GFLOP/s achieved")
    if "data_wait_fraction" in res:
        details.append(f"data wait {100 * res['data_wait_fraction']['median']:.1f}%")
    if "peak_memory_mb" in res:  # every *_mb figure is MiB (2**20 bytes)
        kind = res.get("peak_memory_kind", "")
        if "RSS" in kind:
            details.append(f"max RSS {res['peak_memory_mb']:.0f} MiB")
        elif mode == "step" and "synthetic" not in kind:  # a report written before the pool came out
            details.append(f"peak {res['peak_memory_mb']:.0f} MiB with the synthetic input pool")
        else:
            details.append(f"peak {res['peak_memory_mb']:.0f} MiB")
    if "outside_torch_mb" in res:
        details.append(f"+{res['outside_torch_mb']:.0f} MiB outside torch")
    tb = res.get("time_breakdown")
    if tb and tb.get("networks_share") is not None:
        details.append(f"networks {100 * tb['networks_share']:.0f}% of the step")
    if tb:
        from .breakdown import report_busy_fraction  # torch: a step report's reader has it

        busy = report_busy_fraction(tb)
        if busy is not None:
            details.append(f"GPU busy {100 * busy:.0f}%")
    if res.get("epoch_boundaries_timed"):
        builds = f", {res['sync_builds_timed']} sync builds" if res.get("sync_builds_timed") else ""
        details.append(f"{res['epoch_boundaries_timed']} epoch boundaries timed{builds}")
    tl = res.get("gpu_timeline") or {}
    if "training_kernel_ms" in tl:
        details.append(f"GPU per step: the step's kernels {tl['training_kernel_ms']:.1f} ms, the loader's "
                       f"{tl['loader_kernel_ms']:.1f} ms ({tl['overlap_ms']:.1f} ms overlapping), step streams "
                       f"idle while the loader's run {tl['training_idle_while_loader_ms']:.1f} ms, "
                       f"GPU idle {tl['idle_ms']:.1f} ms")
    cpu = res.get("host_cpu")
    if cpu:
        machine = (f", machine {cpu['machine_busy_cores']:.1f} of {cpu.get('machine_cores', cpu['cores'])}"
                   if cpu.get("machine_busy_cores") is not None else "")
        details.append(f"CPU cores busy: main thread {cpu['main_thread_cores']:.2f}, process "
                       f"{cpu['process_cores']:.1f}{machine}")
    if res.get("loader_gpu_share") is not None:
        details.append(f"loader's GPU work {res['loader_gpu_ms_per_batch']:.1f} ms/batch "
                       f"({100 * res['loader_gpu_share']:.0f}% of the GPU at this rate)")
    if "loader" in res:
        details.append(f"loader {res['loader']}")
    return [mode, variant, f"{res['median']:.1f}", f"{res['min']:.1f}-{res['max']:.1f}",
            f"{res['spread_pct']:.0f}%",
            "1.00x" if variant == "reference" else (f"{ratio:.2f}x" if ratio else "-"), ops_cell(res),
            ", ".join(details)]


# ----------------------------------------------------------------------------- CLI
def _split_list(text: str) -> List[str]:
    return [t for t in (x.strip() for x in text.split(",")) if t]


def cmd_bench(args) -> int:
    from .log import console

    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 alone prints and writes the report
        import io

        from rich.console import Console

        console = Console(file=io.StringIO())
        args.out, args.plot = None, False
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
                      out=args.out, sweep=parse_sweep(args.sweep or []))
    config = None if args.config in ("-", "defaults") else args.config
    report = run_bench(config, overrides, s, argv=["fast-ressl", "bench", *sys.argv[2:]]
                       if sys.argv[1:2] == ["bench"] else None, console=console)
    render_table(report, console)
    for mode, b in report.get("sweep", {}).get("best", {}).items():
        vs = f", {b['vs_fast']:.2f}x the fast config" if "vs_fast" in b else ""
        console.print(f"fastest sweep point ({mode}): {b['variant']}: {b['median']:.1f} images/s, "
                      f"{b['vs_slowest']:.2f}x the slowest point{vs}", highlight=False)
    if s.out:
        console.print(f"wrote {s.out}", highlight=False)
    if args.plot:  # after the JSON is written: a missing matplotlib costs no measurement
        from .plot import plot_bench

        png = plot_bench(report, Path(s.out or "bench.json").with_suffix(".png"))
        console.print(f"wrote {png}", highlight=False)
    if report["failed"]:
        console.print(f"failed: {', '.join(report['failed'])} (the error is in the table and the JSON; "
                      "every other measurement ran)", highlight=False)
        return 1
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
                   help="comma list of channels_last, compile, fused, amp, augment (or 'all'): the "
                   "fast config with that one switch off (augment: loader and e2e modes)")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2,...",
                   help="also measure the fast config with each of these values of KEY (repeat for a "
                   "grid of several keys); the fastest point per mode is printed and in the JSON")
    p.add_argument("--data", default=None, help="JPEG class-folder root for loader/e2e "
                   "(sets data.source=folder data.root=DIR)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps/batches first (default 3)")
    p.add_argument("--iters", type=int, default=10, help="steps/batches per timed repeat (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default 5)")
    p.add_argument("--out", default="bench.json", help="JSON report path (default bench.json)")
    p.add_argument("--plot", action="store_true",
                   help="also draw images/s per mode beside the JSON (.png; needs the plot extra)")
    p.set_defaults(func=cmd_bench)
