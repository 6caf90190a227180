"""Where a training step's time goes (`fast-ressl bench`, step mode, after the timed repeats).

Three views of the same set-up `train.Loop`, none of them inside a timed window:

- networks vs the rest: the student's forward + backward and the teacher's forward run alone on one
  batch (`opcount.network_passes`, same modules, inputs and autocast), each timed over a few
  repetitions (CUDA events on a GPU); `other_ms` = the measured step time minus both, i.e. the
  loss, guard, optimizer, EMA, queue and the host's launch gaps between them.
- device busy: on a GPU, the summed duration of the kernels of two steps under torch.profiler
  (the second one logs, as the last step of each timed window does), per step, divided by the
  measured step time of the timed repeats (`kernel_ms_per_step / step_ms`). Well below 1 means the
  GPU waits for the host (launch-bound: fewer ops, compile, CUDA graphs); near 1 means
  compute-bound. It is not divided by the profiled steps' own wall time: that includes the
  profiler's start-up and CUPTI's warm-up, and on the first H200 run (ResNet-50, batch 256) read
  54% where the kernels summed to 98% of the timed step (165 ms of kernels in 305 ms profiled,
  83.8 ms per timed step). Kernels on several streams can overlap, so it is capped at 1.
- top ops: the ops with the most self time in those two steps (device time on a GPU, CPU time on
  the CPU), so a profile says which kernels to look at first.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import torch

from .opcount import network_passes

TOP = 10  # ops listed
REPS = 3  # timed repetitions of each network pass


def _time_ms(fn: Callable[[], None], device: torch.device, reps: int = REPS) -> float:
    """Median milliseconds of fn() over `reps` runs after one untimed run."""
    fn()
    out: List[float] = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - t0))
    return statistics.median(out)


def _profile_steps(loop: Any, steps: int, step_ms: float) -> Dict[str, Any]:
    """Device busy fraction (GPU: kernel time per step over `step_ms`, the timed step) and the top
    ops by self time over `steps` steps of the loop."""
    from torch.profiler import ProfilerActivity, profile

    dev = loop.env.device
    gpu = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    if gpu:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        loop.run(loop.s.step + steps)
        if gpu:
            torch.cuda.synchronize(dev)
    wall_ms = 1000 * (time.perf_counter() - t0)
    rows = []
    for ev in prof.key_averages():
        self_us = ev.self_device_time_total if gpu else ev.self_cpu_time_total
        if self_us > 0 and (not gpu or ev.device_type == torch.autograd.DeviceType.CUDA):
            rows.append((self_us, ev.key, ev.count))
    rows.sort(reverse=True)
    total_us = sum(r[0] for r in rows)
    out: Dict[str, Any] = {"profiled_steps": steps, "profiled_wall_ms": round(wall_ms, 2),
                           "time_kind": "device (kernels)" if gpu else "cpu (self time of ops)",
                           "top_ops": [{"name": k, "ms_per_step": round(us / 1000 / steps, 3),
                                        "share": round(us / total_us, 4) if total_us else 0.0,
                                        "calls_per_step": round(n / steps, 2)} for us, k, n in rows[:TOP]]}
    if gpu and total_us <= 0:  # CUPTI that did not attach (a warning): no figure rather than 0% busy
        out["profile_error"] = "the profiler recorded no device time"
    elif gpu:
        out["kernel_ms_per_step"] = round(total_us / 1000 / steps, 3)
        out["device_busy_fraction"] = busy_fraction(total_us / 1000 / steps, step_ms)
    return out


def report_busy_fraction(tb: Dict[str, Any]):
    """The busy fraction of a report's time_breakdown, also for reports written before it was kernel
    time over the timed step (no `kernel_ms_per_step`; their `device_busy_fraction` was kernel time
    over the profiled wall time): the kernel time is recovered from those two and divided again.
    None where the report has no GPU profile."""
    busy = tb.get("device_busy_fraction")
    if busy is None or "kernel_ms_per_step" in tb or not tb.get("profiled_wall_ms"):
        return busy
    return busy_fraction(busy * tb["profiled_wall_ms"] / tb["profiled_steps"], tb["step_ms"])


def busy_fraction(kernel_ms_per_step: float, step_ms: float):
    """Kernel time per step over the timed step's wall time, capped at 1 (overlapping streams);
    None without a step time."""
    return round(min(1.0, kernel_ms_per_step / step_ms), 4) if step_ms > 0 else None


def step_breakdown(loop: Any, step_ms: float) -> Dict[str, Any]:
    """`step_ms`: the measured median step time (from the timed repeats). Advances the loop by two
    steps and one batch; the networks-alone passes leave parameters, BN statistics and gradients as
    they found them."""
    dev = loop.env.device
    student_fwd_bwd, teacher_fwd, restore = network_passes(loop)
    try:
        student_ms = _time_ms(student_fwd_bwd, dev)
        teacher_ms = _time_ms(teacher_fwd, dev)
    finally:
        restore()
    out = {"step_ms": round(step_ms, 3), "student_fwd_bwd_ms": round(student_ms, 3),
           "teacher_fwd_ms": round(teacher_ms, 3),
           "other_ms": round(step_ms - student_ms - teacher_ms, 3),
           "networks_share": round((student_ms + teacher_ms) / step_ms, 4) if step_ms else None}
    try:
        out.update(_profile_steps(loop, 2, step_ms))
    except RuntimeError as e:
        # a profiler that cannot attach (CUPTI in a sandbox) must not cost the throughput figures
        # already measured: the report says why this part is missing
        out["profile_error"] = f"{type(e).__name__}: {e}"[:500]
    return out
