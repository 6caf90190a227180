"""Host syncs per training step on a GPU, counted by torch's sync debug mode.

A step that waits for the GPU (an `.item()`, a `bool(tensor)`, a device-to-host copy) stalls the
host's kernel issue: at ~0.1 s per ResNet-50 step at batch 256 one sync can cost a few percent,
more at small per-GPU batches. This runs the training loop of `fast_ressl/train.py` (the same
`train.Loop` that `fast-ressl train` runs, checkpoints and the kNN monitor off) for a few warm-up
steps, then N steps under `torch.cuda.set_sync_debug_mode("warn")`, and records every warning with
the step it fell in, whether it came from the meter's log (`_Meter.log`, the one sync per log
interval by design) and the thread (DALI's next-epoch pipeline is built on a side thread).

Reported (JSON, --out): `syncs_per_step` = syncs on the training thread, outside the log, averaged
over the measured steps that are not log steps (a log step is a multiple of train.log_every or the
last step); the per-step counts; the log steps' syncs; side-thread syncs; and each call site
(file:line, count, message).

    PYTHONPATH=. python benchmarks/gpu_sync_check.py - model.backbone=resnet50 train.batch_size=256 \\
        --data bench_out/bench_jpegs --steps 20 --log-every 10 --out bench_out/sync.json

Needs CUDA (exits 2 without it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import types
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log_steps(start: int, end: int, log_every: int) -> List[int]:
    """Steps start+1 .. end at which the loop logs (one host sync by design)."""
    return [k for k in range(start + 1, end + 1) if k % log_every == 0 or k == end]


# The text of the warning torch's sync debug mode raises at a synchronizing call
# (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync). Other warnings raised meanwhile are not syncs:
# torch 2.11 warns "Synchronization debug mode is a prototype feature ..." when the mode is switched
# on, which the first GPU run's test counted as a sync (H200, 2026-11-29).
SYNC_WARNING = "called a synchronizing CUDA operation"


def is_sync_warning(message: str) -> bool:
    return SYNC_WARNING in message


def summarize_syncs(records: List[Dict[str, Any]], start: int, end: int, log_every: int) -> Dict[str, Any]:
    """records: {"step", "in_log", "main_thread", "where", "message"} per warning; measured steps
    start+1 .. end. Returns the report's sync figures; warnings that are not sync warnings are
    listed apart (`other_warnings`) and counted nowhere else."""
    other = [r for r in records if not is_sync_warning(r["message"])]
    records = [r for r in records if is_sync_warning(r["message"])]
    logs = set(log_steps(start, end, log_every))
    plain = [k for k in range(start + 1, end + 1) if k not in logs]
    per_step = Counter(r["step"] for r in records if r["main_thread"] and not r["in_log"])
    sites = Counter((r["where"], r["main_thread"], r["in_log"], r["message"]) for r in records)
    return {
        "measured_steps": [start + 1, end], "log_steps": sorted(logs), "steps_counted": len(plain),
        "syncs_per_step": (sum(per_step[k] for k in plain) / len(plain)) if plain else None,
        "syncs_by_step": {str(k): per_step[k] for k in range(start + 1, end + 1)},
        "log_syncs": sum(1 for r in records if r["in_log"]),
        "side_thread_syncs": sum(1 for r in records if not r["main_thread"]),
        "total_warnings": len(records),
        "other_warnings": sorted({f"{r['where']}: {r['message']}" for r in other}),
        "sites": [{"where": w, "main_thread": m, "in_log": lg, "message": msg, "count": n}
                  for (w, m, lg, msg), n in sites.most_common()],
    }


def run(config: Optional[str], overrides: List[str], data: Optional[str], warmup: int, steps: int,
        log_every: int, device: str = "cuda") -> Dict[str, Any]:
    """Warm up, then count the warnings of `steps` steps. device="cpu" runs the same harness without
    the sync debug mode (CUDA only), for the CPU test of the attribution."""
    import torch

    from fast_ressl import bench
    from fast_ressl import train as T
    from fast_ressl.config import load_config, to_dict
    from fast_ressl.data import build_loader
    from fast_ressl.optim import build_optimizer
    from fast_ressl.ressl import Queue

    cuda = device == "cuda"
    extra = [f"run.device={device}", f"train.log_every={log_every}", "train.ckpt_every=1000000000",
             "eval.knn_every_epochs=0", "eval.knn_compare_random=false"]
    extra += ["data.source=folder", f"data.root={data}"] if data else ["data.source=synthetic"]
    cfg = load_config(config, [*overrides, *extra])
    env = T.build_env(cfg)
    student, teacher, bn_policy = bench.build_models(cfg, env)  # as train._train (SyncBatchNorm for sync)
    queue = Queue(cfg.method.queue_size, cfg.model.proj_dim, env.device,
                  generator=torch.Generator().manual_seed(cfg.train.seed))
    loader = build_loader(cfg, env.rank, env.world_size, env.device)
    spe = loader.steps_per_epoch
    total = max(cfg.train.epochs * spe, warmup + steps + 1)
    base_lr = cfg.optim.lr * cfg.train.batch_size / 256
    optimizer, optim_desc = build_optimizer(student, cfg.optim, base_lr, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    state = T.State(student, teacher, queue, optimizer, scaler, loader)
    ctx = {"step": 0, "in_log": False}
    records: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fast-ressl-sync-") as tmp:
        meter = T._Meter(cfg, env, Path(tmp), total, spe, 0, live=False)
        meter.display.enabled = False
        loop = T.Loop(cfg, env, state, T.build_loss_fn(cfg, env.rank, cfg.train.batch_size // env.world_size),
                      bn_policy, spe, total, base_lr, None, meter, types.SimpleNamespace(signum=0))
        real_next, real_log = meter.timed_next, meter.log

        def timed_next(data_it):  # the first thing a step does: the step being run is s.step + 1
            ctx["step"] = state.step + 1
            return real_next(data_it)

        def log(*a, **k):
            ctx["in_log"] = True
            try:
                return real_log(*a, **k)
            finally:
                ctx["in_log"] = False

        meter.timed_next, meter.log = timed_next, log
        t0 = time.perf_counter()
        loop.run(warmup)  # lazy optimizer state, cuDNN autotuning, compile, loader start-up
        if cuda:
            torch.cuda.synchronize()
        warm_s = time.perf_counter() - t0
        start = state.step

        def show(message, category, filename, lineno, file=None, line=None):
            records.append({"step": ctx["step"], "in_log": ctx["in_log"],
                            "main_thread": threading.current_thread() is threading.main_thread(),
                            "where": f"{os.path.relpath(filename)}:{lineno}", "message": str(message)[:160]})

        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show  # catch_warnings puts the original back
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                loop.run(start + steps)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
        if cuda:
            torch.cuda.synchronize()
        run_s = time.perf_counter() - t0
        meter.close()
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    res = summarize_syncs(records, start, state.step, log_every)
    res.update({"backbone": cfg.model.backbone, "batch_size": cfg.train.batch_size,
                "precision": cfg.train.precision, "size": cfg.data.weak.size, "loader": cfg.data.loader,
                "source": cfg.data.source, "optimizer": optim_desc, "teacher_bn": bn_policy,
                "steps_per_epoch": spe, "warmup_steps": warmup, "warmup_s": round(warm_s, 2),
                "measured_s": round(run_s, 2),
                "gpu": torch.cuda.get_device_name(env.device) if cuda else None,
                "torch": torch.__version__, "config": to_dict(cfg)})
    return res


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", default="-", help="YAML recipe or '-' for the defaults")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--data", default=None, help="JPEG class-folder root (default: synthetic tensors)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default="bench_out/sync.json")
    p.add_argument("--device", default="cuda",
                   help="cuda (the check); cpu runs the same harness without the sync debug mode (a rehearsal)")
    a = p.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sync_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    res = run(None if a.config in ("-", "defaults") else a.config, a.overrides, a.data, a.warmup, a.steps,
              a.log_every, a.device)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"host syncs per step (training thread, outside the log, {res['steps_counted']} non-log steps): "
          f"{res['syncs_per_step']}; log steps {res['log_steps']}: {res['log_syncs']} syncs; "
          f"side threads: {res['side_thread_syncs']}")
    for site in res["sites"][:10]:
        print(f"  {site['count']:4d}x {site['where']} (main={site['main_thread']}, log={site['in_log']}): "
              f"{site['message']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
