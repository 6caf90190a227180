"""kill -9 and resume on the GPU, compared with an uninterrupted run (as tests/test_reliability.py
does on the CPU): the losses of every step and the final checkpoint's tensors must be bit-identical.

Three `fast-ressl train` processes on the same small JPEG folder (made here by make-bench-data):
A runs uninterrupted; B is killed with SIGKILL once its metrics.jsonl shows step --kill-at (a
random step by default, printed), then the same command runs again and resumes from B's last
checkpoint. train.deterministic=true (cuDNN autotuning off, deterministic algorithms) and
CUBLAS_WORKSPACE_CONFIG=:4096:8 make GPU runs repeatable; the DALI loader is used when DALI is
installed (mixed decode on the GPU), else the torch loader (recorded).

    PYTHONPATH=. python benchmarks/gpu_resume_check.py --work /tmp/resume --out bench_out/resume.json

Reported (JSON): the kill and resume steps, losses equal, the first differing step, the tensors
compared and those that differ (with the max abs difference), wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(root: Path, loader: str, device: str, backbone: str, size: int, batch: int,
              epochs: int) -> List[str]:
    return ["data.source=folder", f"data.root={root}", f"data.loader={loader}", "data.num_threads=4",
            f"data.weak={{size: {size}}}", f"data.strong=[{{size: {size}}}]", f"model.backbone={backbone}",
            f"method.queue_size={4 * batch}", f"train.batch_size={batch}", f"train.epochs={epochs}",
            "train.deterministic=true", "train.ckpt_every=2", "train.log_every=1", f"run.device={device}",
            "eval.knn_every_epochs=0", "optim.warmup_epochs=0.5"]


def _env() -> Dict[str, str]:
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONPATH": str(REPO)}
    env.pop("FAST_RESSL_FAULT_NAN", None)
    return env


def _cmd(recipe: Path, over: List[str], run: Path) -> List[str]:
    return [sys.executable, "-m", "fast_ressl", "train", str(recipe), *over, f"run.dir={run}"]


def losses(run: Path) -> Dict[int, float]:
    """step -> loss, the last record per step (a killed run re-runs the steps after its checkpoint)."""
    by_step: Dict[int, float] = {}
    path = run / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if "loss" in r:
                    by_step[int(r["step"])] = r["loss"]
    return by_step


def compare_checkpoints(a: dict, b: dict) -> Dict[str, Any]:
    """Tensors of student, teacher, queue and optimizer state: names compared, those that differ."""
    import torch

    pairs = []
    for key in ("student", "teacher"):
        pairs += [(f"{key}.{n}", t, b[key].get(n)) for n, t in a[key].items()]
    pairs.append(("queue.buffer", a["queue"]["buffer"], b["queue"]["buffer"]))
    for i, st in a["optimizer"]["state"].items():
        for n, t in st.items():
            if torch.is_tensor(t):
                pairs.append((f"optimizer.{i}.{n}", t, b["optimizer"]["state"].get(i, {}).get(n)))
    differ = []
    for name, x, y in pairs:
        if y is None or x.shape != y.shape:
            differ.append({"name": name, "max_abs_diff": None})
        elif not torch.equal(x, y):
            d = (x.double() - y.double()).abs().max().item()
            differ.append({"name": name, "max_abs_diff": d})
    return {"tensors_compared": len(pairs), "tensors_differ": differ,
            "queue_ptr_equal": int(a["queue"]["ptr"]) == int(b["queue"]["ptr"]),
            "step_a": int(a["step"]), "step_b": int(b["step"])}


def run_check(work: Path, device: str = "cuda", kill_at: Optional[int] = None, backbone: str = "resnet18",
              size: int = 64, batch: int = 16, images: int = 64, epochs: int = 3,
              timeout: float = 240.0) -> Dict[str, Any]:
    from fast_ressl.benchdata import make_bench_data
    from fast_ressl.checkpoint import safe_load

    work.mkdir(parents=True, exist_ok=True)
    root = work / "jpegs"
    make_bench_data(root, images=images, classes=4, quiet=True)
    try:
        import nvidia.dali  # noqa: F401

        loader = "dali"
    except ImportError:
        loader = "torch"
    recipe = work / "empty.yaml"
    recipe.write_text("{}\n")
    over = overrides(root, loader, device, backbone, size, batch, epochs)
    steps = epochs * (images // batch)
    kill_at = kill_at or random.Random().randint(3, steps - 3)
    res: Dict[str, Any] = {"device": device, "loader": loader, "backbone": backbone, "size": size,
                           "batch_size": batch, "steps": steps, "kill_at": kill_at, "overrides": over}
    a, b = work / "a", work / "b"
    for d in (a, b):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    t0 = time.perf_counter()
    out = subprocess.run(_cmd(recipe, over, a), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    res["uninterrupted_s"] = round(time.perf_counter() - t0, 1)
    if out.returncode != 0:
        return {**res, "ok": False, "error": f"uninterrupted run exited {out.returncode}: {out.stderr[-1500:]}"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(_cmd(recipe, over, b), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    reached = 0
    while time.perf_counter() - t0 < timeout:
        done = losses(b)
        reached = max(done) if done else 0
        if reached >= kill_at or proc.poll() is not None:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return {**res, "ok": False, "error": f"run B ended (rc {proc.returncode}) before step {kill_at} was seen "
                                             f"(last step {reached}): {proc.stderr.read()[-1500:]}"}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    res.update({"killed_at_step": reached, "kill_rc": proc.returncode})
    out = subprocess.run(_cmd(recipe, over, b), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    res["killed_and_resumed_s"] = round(time.perf_counter() - t0, 1)
    if out.returncode != 0:
        return {**res, "ok": False, "error": f"resumed run exited {out.returncode}: {out.stderr[-1500:]}"}
    resumed = [ln for ln in out.stdout.splitlines() if "resumed from" in ln]
    res["resumed"] = resumed[-1].split("resumed from", 1)[1].strip() if resumed else None
    la, lb = losses(a), losses(b)
    res["losses_equal"] = la == lb and len(la) == steps
    res["first_differing_step"] = next((k for k in sorted(la) if la.get(k) != lb.get(k)), None)
    res["losses_a"] = [la[k] for k in sorted(la)]
    res["losses_b"] = [lb[k] for k in sorted(lb)]
    cmp = compare_checkpoints(safe_load(a / "checkpoints" / "last.pt"), safe_load(b / "checkpoints" / "last.pt"))
    res.update(cmp)
    res["ok"] = bool(res["resumed"] and res["losses_equal"] and not cmp["tensors_differ"] and cmp["queue_ptr_equal"]
                     and cmp["step_a"] == cmp["step_b"] == steps)
    return res


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/fast_ressl_resume_check", help="scratch folder (images, run dirs)")
    p.add_argument("--out", default="bench_out/resume.json")
    p.add_argument("--device", default="cuda", help="cuda (the check); cpu runs the same harness")
    p.add_argument("--kill-at", type=int, default=None, help="step to SIGKILL at (default: random)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_resume_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    res = run_check(Path(a.work), a.device, a.kill_at, a.backbone, a.size, a.batch, a.images, a.epochs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"kill -9 at step {res.get('killed_at_step')} (asked {res['kill_at']}), resumed from "
          f"{res.get('resumed')}: losses equal {res.get('losses_equal')}, "
          f"{len(res.get('tensors_differ', []))} of {res.get('tensors_compared')} tensors differ -> "
          f"{'OK' if res['ok'] else 'FAILED'}" + (f" ({res['error']})" if "error" in res else ""))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
