"""kill -9 and resume on the GPU, compared with an uninterrupted run (as tests/test_reliability.py
does on the CPU): the losses of every step and the final checkpoint's tensors must be bit-identical.

`fast-ressl train` processes on the same small JPEG folder (made here by make-bench-data): A runs
uninterrupted; B is killed with SIGKILL once its metrics.jsonl shows step --kill-at (a random step
by default, printed), then the same command runs again and resumes from B's last checkpoint.
train.deterministic=true (cuDNN autotuning off, deterministic algorithms where torch has them, with
warn_only) and CUBLAS_WORKSPACE_CONFIG=:4096:8 aim to make GPU runs repeatable; the DALI loader is
used when DALI is installed (mixed decode on the GPU), else the torch loader (recorded).

A control run A2 (the same uninterrupted command again; --no-control skips it) tells the resume's
fault from the GPU's: if A2 equals A bit for bit, B must too ("bitwise"); if not, some kernel is not
deterministic (atomics) and no resume can be bitwise, so B passes when it is as close to A as A2
is: max |loss_B - loss_A| <= 2 x max |loss_A2 - loss_A| + 1e-6 ("float tolerance"). The report
says which criterion applied and both distances.

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
    """The runs' environment: the repository first on PYTHONPATH, what was there kept (gpu_check puts
    gpu_install's fallback folder there when the image's site-packages cannot be written: without
    it the runs could not import omegaconf)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONPATH": path}
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


def max_loss_diff(a: Dict[int, float], b: Dict[int, float]) -> Optional[float]:
    """max |a - b| over the steps both have (None if a step is missing from either)."""
    if set(a) != set(b):
        return None
    return max((abs(a[k] - b[k]) for k in a), default=0.0)


def judge(la: Dict[int, float], lb: Dict[int, float], cmp: Dict[str, Any],
          ctl: Optional[tuple], finished: bool) -> Dict[str, Any]:
    """The verdict on resumed run B against uninterrupted run A (losses la, lb; cmp: their final
    checkpoints compared), given the control run A2 as (losses, checkpoint comparison with A) or
    None: bitwise when A2 repeats A bit for bit (or without a control), else float tolerance."""
    out: Dict[str, Any] = {"criterion": "bitwise"}
    if ctl is not None:
        l2, c2 = ctl
        out["control"] = {"losses_equal": l2 == la, "max_loss_diff": max_loss_diff(la, l2),
                          "tensors_differ": len(c2["tensors_differ"]),
                          "max_tensor_diff": max((d["max_abs_diff"] if d["max_abs_diff"] is not None
                                                  else float("inf") for d in c2["tensors_differ"]), default=0.0)}
        out["repeatable"] = l2 == la and not c2["tensors_differ"]
        if not out["repeatable"]:
            out["criterion"] = "float tolerance"
            d_ctl, d_res = out["control"]["max_loss_diff"], max_loss_diff(la, lb)
            out["ok"] = finished and d_ctl is not None and d_res is not None and d_res <= 2 * d_ctl + 1e-6
            return out
    out["ok"] = finished and la == lb and not cmp["tensors_differ"]
    return out


def run_check(work: Path, device: str = "cuda", kill_at: Optional[int] = None, backbone: str = "resnet18",
              size: int = 64, batch: int = 16, images: int = 64, epochs: int = 3,
              timeout: float = 240.0, control: bool = True) -> Dict[str, Any]:
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
    a, a2, b = work / "a", work / "a2", work / "b"
    for d in (a, a2, b):
        if d.exists():
            import shutil

            shutil.rmtree(d)
    t0 = time.perf_counter()
    out = subprocess.run(_cmd(recipe, over, a), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    res["uninterrupted_s"] = round(time.perf_counter() - t0, 1)
    if out.returncode != 0:
        return {**res, "ok": False, "error": f"uninterrupted run exited {out.returncode}: {out.stderr[-1500:]}"}
    if control:
        out = subprocess.run(_cmd(recipe, over, a2), cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            return {**res, "ok": False, "error": f"control run exited {out.returncode}: {out.stderr[-1500:]}"}
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
    res["max_loss_diff_resumed"] = max_loss_diff(la, lb)
    ca = safe_load(a / "checkpoints" / "last.pt")
    cmp = compare_checkpoints(ca, safe_load(b / "checkpoints" / "last.pt"))
    res.update(cmp)
    finished = bool(res["resumed"]) and cmp["queue_ptr_equal"] and cmp["step_a"] == cmp["step_b"] == steps
    ctl = None
    if control:
        ctl = (losses(a2), compare_checkpoints(ca, safe_load(a2 / "checkpoints" / "last.pt")))
    res.update(judge(la, lb, cmp, ctl, finished))
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
    p.add_argument("--no-control", dest="control", action="store_false",
                   help="skip the control run (a second uninterrupted run that shows whether the GPU "
                   "repeats itself bit for bit)")
    a = p.parse_args(argv)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_resume_check: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
    res = run_check(Path(a.work), a.device, a.kill_at, a.backbone, a.size, a.batch, a.images, a.epochs,
                    control=a.control)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    ctl = res.get("control")
    ctl_text = "" if ctl is None else (
        "; control run: bit-identical" if res.get("repeatable") else
        f"; control run NOT bit-identical (max loss diff {ctl['max_loss_diff']}), so judged to float "
        f"tolerance: resumed max loss diff {res.get('max_loss_diff_resumed')}")
    print(f"kill -9 at step {res.get('killed_at_step')} (asked {res['kill_at']}), resumed from "
          f"{res.get('resumed')}: losses equal {res.get('losses_equal')}, "
          f"{len(res.get('tensors_differ', []))} of {res.get('tensors_compared')} tensors differ{ctl_text} -> "
          f"{'OK' if res['ok'] else 'FAILED'} ({res.get('criterion')})" + (f" ({res['error']})" if "error" in res else ""))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
