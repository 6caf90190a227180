"""Ops per training step, and how many of them are bookkeeping around the networks.

On a GPU every top-level aten op launches at least one kernel, and the host has to issue them all:
at the ImageNet recipe's 32 images per GPU a step that issues ~1,500 ops is launch-bound. Counted
with torch.profiler on the CPU (the count does not depend on the device, the image size or the
batch size): the top-level aten ops of one step (an aten op with no aten op above it; ops inside a
compiled region's generated kernels are not aten ops, so a compiled region counts its extern calls,
e.g. matmuls), minus those of the student's forward + backward and the teacher's forward run alone
the same way (same modules, inputs and autocast). The difference is the step's bookkeeping: schedule,
input preparation, loss (forward and backward), non-finite guard, BN-statistics restore, optimizer,
EMA, queue and metrics.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Any, Callable, Dict, Tuple

import torch


def quiet_kineto_without_cuda() -> None:
    """Call before torch.profiler starts. On a machine without a usable CUDA device, set
    KINETO_LOG_LEVEL=6 unless the user set it: there torch 2.14's kineto (the profiler's back end)
    printed an ERROR line for its failed device probe ("gpuGetDeviceCount failed with code 35") and
    two "USDT ... profiler_start/stop" lines per profile, 21 lines between the progress lines of a
    CPU `fast-ressl bench --modes step,e2e`. kineto reads the level once, at the process's first
    profile. With CUDA its messages (CUPTI's errors among them) are left as they are."""
    if "KINETO_LOG_LEVEL" not in os.environ and not torch.cuda.is_available():
        os.environ["KINETO_LOG_LEVEL"] = "6"


def top_level_aten_ops(fn: Callable[[], Any]) -> Counter:
    """Counter of the top-level aten op names that running fn() issues (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    quiet_kineto_without_cuda()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[ev.name] += 1
    return counts


def network_passes(loop: Any) -> Tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """The networks of one step of `loop`, alone, on its next batch: (student forward + backward of
    the strong views, teacher forward of the weak view, restore). The passes change BN statistics
    and gradients; restore() puts both back as they were when this was called."""
    s = loop.s
    batch = next(loop.data)
    x_weak, x_strong = loop.prep(batch.x_weak), [loop.prep(x) for x in batch.x_strong]
    saved = [f.clone() for f in loop.guard.flats]
    s.optimizer.zero_grad(set_to_none=True)  # as in the step: backward writes fresh gradients
    # with CUDA graphs (model.compile_mode=reduce-overhead) every pass is a step of its own:
    # inductor may reuse a graph's output memory from the next mark on
    mark = torch.compiler.cudagraph_mark_step_begin if getattr(loop, "cudagraphs", False) else (lambda: None)
    mark()
    with loop.amp:
        grad = torch.ones_like(loop.student(x_strong))

    def student_fwd_bwd() -> None:
        # fresh gradients every pass, as the step's backward writes them: repeated passes (the
        # breakdown times 4) would otherwise accumulate into the last one's, an add per parameter
        # the step does not do (efficientnet_b0's networks read 105% of its step on the H200)
        s.optimizer.zero_grad(set_to_none=True)
        mark()
        with loop.amp:
            z = loop.student(x_strong)
        z.backward(grad)

    def teacher_fwd() -> None:
        # under no_grad, as in the step (dist.teacher_keys): dynamo guards on grad mode, so with
        # grad on a compiled teacher was compiled a second time inside the profiled call (found in
        # review: network_ops 501 > ops_per_step 195 on the CPU), and with CUDA graphs a second
        # graph would be recorded and timed instead of the step's
        mark()
        with torch.no_grad(), loop.amp:
            loop.teacher(x_weak)

    def restore() -> None:
        s.optimizer.zero_grad(set_to_none=True)
        for flat, old in zip(loop.guard.flats, saved):
            flat.copy_(old)

    return student_fwd_bwd, teacher_fwd, restore


def step_op_counts(loop: Any) -> Dict[str, Any]:
    """Profile one step of a set-up `train.Loop` (run one warm-up step first: compile, lazy state),
    then the networks alone. Returns {"ops_per_step", "network_ops", "bookkeeping_ops",
    "bookkeeping_share", "bookkeeping_by_op"}. Advances the loop by three steps; the networks-alone
    passes leave parameters, BN statistics and gradients as they found them."""
    s = loop.s
    # run(end) logs (host sync, metrics) at its last step; a 2-step window minus a 1-step window is
    # one ordinary step, as in training between log intervals
    one = top_level_aten_ops(lambda: loop.run(s.step + 1))
    total = top_level_aten_ops(lambda: loop.run(s.step + 2))
    total.subtract(one)
    total = +total  # drop the zero and (noise) negative entries
    student_fwd_bwd, teacher_fwd, restore = network_passes(loop)
    nets = top_level_aten_ops(student_fwd_bwd) + top_level_aten_ops(teacher_fwd)
    restore()
    n_total, n_nets = sum(total.values()), sum(nets.values())
    extra = total.copy()
    extra.subtract(nets)
    return {"ops_per_step": n_total, "network_ops": n_nets, "bookkeeping_ops": n_total - n_nets,
            "bookkeeping_share": round((n_total - n_nets) / n_total, 4) if n_total else 0.0,
            "bookkeeping_by_op": {k: v for k, v in extra.most_common() if v != 0}}
