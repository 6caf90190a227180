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
from typing import Any, Callable, Dict, List, Tuple

import torch

from .opcount import network_passes, quiet_kineto_without_cuda

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


def profiled(fn: Callable[[], None], device: torch.device) -> tuple:
    """(profile, wall ms) of fn() under torch.profiler: CPU activity, plus CUDA on a GPU, whose
    queued work is waited for before (not timed) and after (timed). CPU activity on a GPU too: a
    profiler whose CUDA side cannot start then still runs and records no device time (each caller
    reports that as such) instead of failing on an empty activity list."""
    from torch.profiler import ProfilerActivity, profile

    quiet_kineto_without_cuda()
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        fn()
        if gpu:
            torch.cuda.synchronize(device)
    return prof, 1000 * (time.perf_counter() - t0)


def device_work_us(ev: Any) -> float:
    """Self device time (us) of a key_averages row that is work on the GPU, else 0. Not the spans of
    torch's annotations (`record_function` regions such as "Optimizer.step#SGD.step", dynamo's
    compiled regions): kineto gives each a device row spanning its kernels, gaps included, so
    summing it counts those kernels twice (on the first H200 run the reference's optimizer-step span
    read 7.4-12.9 ms per step). torch's own table leaves them out of its device total too."""
    if ev.device_type != torch.autograd.DeviceType.CUDA or getattr(ev, "is_user_annotation", False):
        return 0.0
    return ev.self_device_time_total


def _profile_steps(loop: Any, steps: int, step_ms: float) -> Dict[str, Any]:
    """Device busy fraction (GPU: kernel time per step over `step_ms`, the timed step) and the top
    ops by self time over `steps` steps of the loop."""
    gpu = loop.env.device.type == "cuda"
    prof, wall_ms = profiled(lambda: loop.run(loop.s.step + steps), loop.env.device)
    rows = []
    for ev in prof.key_averages():
        self_us = device_work_us(ev) if gpu else ev.self_cpu_time_total
        if self_us > 0:
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
        out["annotations_excluded"] = True  # report_busy_fraction: nothing to take off
    return out


def report_busy_fraction(tb: Dict[str, Any]):
    """The busy fraction of a report's time_breakdown, also for reports written before it was kernel
    time over the timed step (no `kernel_ms_per_step`; their `device_busy_fraction` was kernel time
    over the profiled wall time): the kernel time is recovered from those two and divided again.
    Reports written before annotation spans were left out of the kernel time (no
    `annotations_excluded`) lose the spans their top ops list (ANNOTATION_PREFIXES); a span
    outside the top ops stays counted (at most the smallest listed op's time). None where the
    report has no GPU profile."""
    busy = tb.get("device_busy_fraction")
    if busy is None or tb.get("annotations_excluded"):
        return busy
    if "kernel_ms_per_step" in tb:
        kernel_ms = tb["kernel_ms_per_step"]
    elif tb.get("profiled_wall_ms"):
        kernel_ms = busy * tb["profiled_wall_ms"] / tb["profiled_steps"]
    else:
        return busy
    spans = sum(o["ms_per_step"] for o in tb.get("top_ops", []) if o["name"].startswith(ANNOTATION_PREFIXES))
    return busy_fraction(kernel_ms - spans, tb["step_ms"])


# Names of torch's own annotation regions that kineto also puts on the device (spanning their
# kernels): the optimizer's step and zero_grad, dynamo's compiled regions, the profiler's steps.
# Kernel names never start so (void ..., sm90_..., cutlass..., Memcpy ...).
ANNOTATION_PREFIXES = ("Optimizer.", "Torch-Compiled Region", "CompiledFunction", "ProfilerStep#")


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


# ----------------------------------------------------------------------------- e2e: who uses the GPU
def _merge(intervals: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Sorted, disjoint union of [start, end) intervals."""
    out: List[List[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(merged: List[Tuple[int, int]]) -> int:
    return sum(b - a for a, b in merged)


def _intersection(x: List[Tuple[int, int]], y: List[Tuple[int, int]]) -> int:
    """Length of the intersection of two merged interval lists."""
    i = j = total = 0
    while i < len(x) and j < len(y):
        lo, hi = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        total += max(0, hi - lo)
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return total


def device_timeline(events: List[Tuple[int, int, int, bool]], steps: int) -> Dict[str, Any]:
    """Who keeps the GPU busy over `steps` training steps, from device events (kernels, copies,
    memsets) as (stream, start_ns, end_ns, launched_by_a_torch_op).

    The training streams are those on which at least one event was launched inside a torch op (the
    profiler links it to the op); every other stream is the loader's (DALI's own streams: its
    threads launch outside any torch op). Per step, in ms, over the window from the step's first
    device event to its last; the loader's events are cut to it (DALI keeps filling its prefetch
    queue after the profiled steps end, and may be busy before their first kernel: outside the
    window that is not time the step lost):
    - training_kernel_ms: summed durations on the training streams (compare with the step alone's
      kernel_ms_per_step: longer beside the loader = the two share SMs / memory bandwidth);
    - training_busy_ms / loader_busy_ms: time with at least one event running on those streams;
    - overlap_ms: time both run at once;
    - training_idle_while_loader_ms: the training streams idle while only the loader's work runs
      (the step waiting on the loader's batch on the device, or the two serialized);
    - idle_ms: nothing running on the device (the GPU waits for the host)."""
    if not events:
        return {"timeline_error": "the profiler recorded no device events"}
    train_streams = {s for s, _, _, linked in events if linked}
    if not train_streams:
        return {"timeline_error": "no device event was linked to a torch op (the profiler could not "
                                  "correlate kernels with ops)"}
    train = [(a, b) for s, a, b, _ in events if s in train_streams]
    w0, w1 = min(a for a, _ in train), max(b for _, b in train)
    other = [(max(a, w0), min(b, w1)) for s, a, b, _ in events if s not in train_streams and a < w1 and b > w0]
    mt, mo = _merge(train), _merge(other)
    window = w1 - w0
    busy_all = _length(_merge(train + other))
    overlap = _intersection(mt, mo)
    per = 1e6 * steps  # ns -> ms per step
    return {"profiled_steps": steps, "window_ms_per_step": round(window / per, 3),
            "training_streams": len(train_streams),
            "loader_streams": len({s for s, _, _, _ in events} - train_streams),
            "training_kernel_ms": round(sum(b - a for a, b in train) / per, 3),
            "training_busy_ms": round(_length(mt) / per, 3),
            "loader_kernel_ms": round(sum(b - a for a, b in other) / per, 3),
            "loader_busy_ms": round(_length(mo) / per, 3),
            "overlap_ms": round(overlap / per, 3),
            "training_idle_while_loader_ms": round((_length(mo) - overlap) / per, 3),
            "idle_ms": round((window - busy_all) / per, 3)}


def e2e_timeline(loop: Any, steps: int) -> Dict[str, Any]:
    """`device_timeline` of `steps` end-to-end steps of the loop under torch.profiler (CUPTI sees
    every kernel of the process: the step's and DALI's); advances the loop by `steps`.
    Why: on the first H200 run efficientnet_b0 and mobilenetv3 ran end to end at 0.77x and 0.65x
    their steps alone while the step waited for batches only 1.2-1.4% of the time, and the host's
    figures cannot say whether the loader's kernels slow the step's (shared SMs), the device waits
    on the loader's batch, or the host falls behind (CPU); this timeline separates the three."""
    # on the CPU (tests) the same extraction runs over real profiler events and finds no device ones
    prof, _ = profiled(lambda: loop.run(loop.s.step + steps), loop.env.device)
    # kineto's own events: the device ones carry their stream (device_resource_id) and the torch op
    # that launched them (linked_correlation_id, 0 for a launch outside any op, e.g. DALI's threads)
    rows = [(ev.device_type(), ev.device_resource_id(), ev.start_ns(), ev.duration_ns(), ev.linked_correlation_id(),
             ev.is_user_annotation()) for ev in prof.profiler.kineto_results.events()]
    return device_timeline(device_events(rows), steps)


def device_events(rows: List[Tuple[Any, int, int, int, int, bool]]) -> List[Tuple[int, int, int, bool]]:
    """device_timeline's events from kineto's (device type, stream, start ns, duration ns, linked op's
    correlation id, is an annotation): the CUDA ones with a duration, as (stream, start, end,
    launched inside a torch op), without annotation spans (kineto puts a `record_function`
    region on the device too, spanning its kernels: not work of its own; see device_work_us)."""
    cuda = torch.autograd.DeviceType.CUDA
    return [(stream, t0, t0 + dur, link > 0) for kind, stream, t0, dur, link, note in rows
            if kind == cuda and dur > 0 and not note]
