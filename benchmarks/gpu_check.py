"""The GPU check in one call (`bash benchmarks/gpu_check.sh`, which runs this file).

On a lent GPU machine, with DALI carried as benchmarks/gpu_carry.sh prints (this installs it when
it is not importable yet), stages run in this order, each under its own timeout and all under one
wall-clock budget (default 540 s: a session's 15 minutes of device time also pay for the machine's
start, 1-2 min, and the two calls that carry DALI's first parts, ~0.5 min, which leaves ~2.5 min for a
slow start; a command may run 10 min at most; with less device time left, pass --budget = status's
budget_left_s minus ~100 s):

  dali      DALI and omegaconf importable, else benchmarks/gpu_install.py on the parts carried
            (benchmarks/gpu_carry.sh made them; the last one beside SHA256SUMS, the others copied
            to /tmp/dali-parts by earlier calls)
  data      make-bench-data: --images ImageNet-like JPEGs in --parallel parts (different seeds),
            started after the install, in the background, merged into one class-folder tree
  pytest    pytest -m gpu (the GPU-marked tests; the DALI pipeline's first), with pytest-xdist
            workers where it is installed (1 per 4 cores, at most 4)
  bench_<m> fast-ressl bench for the first model (default resnet50): step and e2e, fast vs
            reference, 224 px, bf16, batch 256, plus the loader mode (the pipeline alone, the same
            for every backbone) and the loader without the student view's colour/blur ops
            (--ablate augment); from these each model's bound (compute, decoder or augmentation)
            is named in `bounds`, and issue 11's targets are reported in `targets`
  sync      benchmarks/gpu_sync_check.py: host syncs per training step (the first model on the JPEGs)
  bench_<m> the other models (default efficientnet_b0, mobilenetv3_large_100): step and e2e
  resume    benchmarks/gpu_resume_check.py: kill -9 + resume of `fast-ressl train` on the JPEGs vs
            an uninterrupted run, bitwise (after the benches: pytest -m gpu ran one on synthetic data)
  tune_step with what is left of the budget: the first model's step over a grid (--tune-step;
            default the networks compiled or not x bf16 or fp16: model.compile=false,true x
            train.precision=bf16,fp16), vs the fast default
  tune_e2e  the last model end to end over DALI threads x hw_decoder_load (--tune-e2e; default
            4/8/12 x 0.65/0.95): where the loader slows the step beside it, the loader alone is the
            wrong thing to tune
  tune_loader  the loader alone over a grid of DALI settings (`bench --sweep`, --tune; default
            prefetch depth 1/2/3 x hw_decoder_load 0/0.65/0.95 at the run's threads, which tune_e2e
            sweeps end to end), vs the grid's point at the bench's settings
  ddp       the first model's fast step under DDP: torchrun with one rank and
            FAST_RESSL_DDP_ONE_RANK=1 (an NCCL process group of one; NCCL refuses two ranks on one
            GPU), vs the plain fast step of its bench: what a multi-GPU run's machinery costs per
            GPU before any traffic between GPUs: DDP, and the teacher's shuffle-BN, which
            model.teacher_bn=auto picks in a process group (its gather and index copies)

A stage that fails or times out is recorded and the next one runs; a stage that no longer fits in
the budget is recorded as skipped, and the summary ends with the command of a later call that runs
only what is left (`next_call` in gpu_check.json: --skip names every stage that passed; DALI is
carried and the JPEGs made again, as a fresh machine needs; the loader mode then rides with the
first model whose bench runs). Everything goes to --out (default $OUT, else
bench_out/gpu_check), at most 8 files with the default three models (the device tool brings back
8): gpu_check.json (machine, versions, settings, every stage's status, times and parsed results, the
full bench reports), gpu_check.log (each stage's log tail), bench_<model>.json, tune_loader.json,
tune_step.json and tune_e2e.json (the
reports, for benchmarks/results/; the benches write them there as they measure, so a call killed at
the device's limit still brings back every finished measurement). On SIGTERM/SIGINT the running
stage is recorded as killed, with what it had written, before the script exits. Scratch files
(JPEGs, run dirs) go to --work. A short table is printed last.
Exit status: 0 if every stage passed, 1 otherwise, 2 without CUDA or without omegaconf after the
install (every stage imports it: nothing else is run).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from gpu_install import FALLBACK_TARGET

REPO = Path(__file__).resolve().parents[1]
MODELS = ("resnet50", "efficientnet_b0", "mobilenetv3_large_100")
# Seconds kept back from the budget for the report; a stage with less than MIN_STAGE_S left is skipped.
RESERVE_S, MIN_STAGE_S = 15.0, 20.0
# Stages that cannot give anything in less: a bench's first measurement comes after its imports,
# the loader's scan and a compiled step's first compile; the resume check is all or nothing (four
# train runs: 140 s on the first H200 run); tune_step compiles the networks twice.
STAGE_MIN_S = {"bench": 60.0, "resume": 145.0, "tune_step": 120.0}
# Each bench stage's timeout. On the first H200 run resnet50's 9 measurements (3 variants x
# loader/step/e2e, after decoding all 16384 JPEGs once for the denylist) needed more than its 150 s
# (8 done in 156 s); mobilenetv3's 4 took 113 s in a call of their own (efficientnet_b0's stage had
# only the 98 s left of the budget: 3 of 4 done). Since then the reference torch loader's warm-up
# takes its 48 batches in flight and its windows 12 batches (bench.loader_cadence): ~20 s more for
# its e2e at the ~700 images/s it ran at, ~10 s for its loader alone.
BENCH_TIMEOUT_S = {"first": 270.0, "other": 180.0}
# tune_step's default grid: the networks compiled or not, in bf16 or fp16. Why these, from the first
# H200 run (ResNet-50, batch 256, bf16): the step's kernels summed to 98% of its wall time (no launch
# gaps for CUDA graphs, model.compile_mode=reduce-overhead, to remove), while batch norm's four
# kernels took 46% of it: torch's own channels-last kernels, because torch does not send bf16 inputs to
# cuDNN's batch norm (aten/src/ATen/native/Normalization.cpp, _select_batch_norm_backend) and does
# send fp16 ones with fp32 weights (AMP's case). Compiling fuses batch norm into generated kernels.
TUNE_STEP = ("model.compile=false,true", "train.precision=bf16,fp16")
# tune_e2e's default grid (the last model end to end; its point 12 threads x 0.65 is the bench's own)
TUNE_E2E = ("data.num_threads=4,8,12", "data.hw_decoder_load=0.65,0.95")
# tune_loader's default grid, the loader alone at the run's threads: DALI's prefetch depth (issue 11
# asks for it; depth 1 leaves the CPU and GPU stages of consecutive batches unoverlapped) x the
# hardware decoder's share (0: every image on the CUDA decoder). The threads are tune_e2e's: on
# the first H200 run the loader alone made 4x what the ResNet-50 step used, and where the loader
# does hold a step back it is end to end, beside the step.
TUNE_LOADER = ("data.prefetch_queue_depth=1,2,3", "data.hw_decoder_load=0,0.65,0.95")
# Seconds a stage past its timeout gets between SIGINT (write what you have) and SIGKILL.
GRACE_S = 10.0


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench_out" / "gpu_check"),
                   help="where the JSON, log and bench reports go (default $OUT, else bench_out/gpu_check)")
    p.add_argument("--work", default="/tmp/fast_ressl_gpu_check", help="scratch: JPEGs, run dirs, logs")
    p.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for everything (default 540)")
    p.add_argument("--images", type=int, default=16384,
                   help="benchmark JPEGs to make (default 16384: 64 batches of 256, so a timed window "
                   "crosses at most one epoch boundary; ~70 JPEGs/s per process measured here, 1.8 GB)")
    p.add_argument("--parallel", type=int, default=12, help="make-bench-data processes (default 12)")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of timm backbones to bench")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--threads", type=int, default=None,
                   help="data.num_threads: DALI threads / DataLoader workers (default cores - 4, at most 12)")
    p.add_argument("--warmup", type=int, default=5, help="bench warm-up steps (default 5)")
    p.add_argument("--iters", type=int, default=10, help="bench steps per timed repeat (default 10)")
    p.add_argument("--repeats", type=int, default=3, help="bench timed repeats (default 3)")
    p.add_argument("--sync-steps", type=int, default=20, help="steps counted by the sync check (default 20)")
    p.add_argument("--dali-sums", default=str(REPO / ".device-carry" / "SHA256SUMS"),
                   help="SHA256SUMS of the parts benchmarks/gpu_carry.sh made (the parts beside it or in "
                   "/tmp/dali-parts)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: a rehearsal of the script itself on a machine without a GPU (with small "
                   "--models/--size/--batch/--images; its figures mean nothing)")
    p.add_argument("--skip", default="",
                   help="comma list of stages to skip (dali, pytest, bench = every bench_<model>, "
                   "bench_<model>, sync, resume, tune = tune_loader + tune_step + tune_e2e, ddp); the summary prints "
                   "the --skip of a later call that runs only what is left")
    p.add_argument("--tune", action="append", default=None, metavar="KEY=V1,V2,...",
                   help="the tune_loader stage's grid (bench --sweep; repeat per key; default "
                   f"{' and '.join(TUNE_LOADER)})")
    p.add_argument("--tune-step", action="append", default=None, metavar="KEY=V1,V2,...",
                   help="the tune_step stage's grid (bench --sweep; repeat per key; default "
                   f"{' and '.join(TUNE_STEP)})")
    p.add_argument("--tune-e2e", action="append", default=None, metavar="KEY=V1,V2,...",
                   help="the tune_e2e stage's grid for the last model end to end (bench --sweep; default "
                   f"{' and '.join(TUNE_E2E)})")
    p.add_argument("--pytest-k", default=None, metavar="EXPR",
                   help="run only the GPU tests pytest -k EXPR selects (a later call re-checking a fix)")
    a = p.parse_args(argv)
    a.tune = a.tune or list(TUNE_LOADER)
    a.tune_step = a.tune_step or list(TUNE_STEP)
    a.tune_e2e = a.tune_e2e or list(TUNE_E2E)
    return a


class Runner:
    """Runs stages as subprocesses in their own process group (a timeout kills DataLoader workers
    and torchrun children too), under one deadline; records each stage; on SIGTERM/SIGINT kills
    every process it started."""

    def __init__(self, work: Path, budget: float, t0: Optional[float] = None):
        # t0: when the script started (main passes it): the CUDA probe before the Runner exists
        # takes 10-20 s on a cold machine, and the device's limit counts it
        self.t0 = time.time() if t0 is None else t0
        self.deadline = self.t0 + budget
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stages: Dict[str, Dict[str, Any]] = {}
        # TMPDIR under the scratch folder: what the stages leave in a temporary folder stays there
        # (the killed run of the resume stage leaves DALI's autograph modules, 11 seen in /tmp after
        # a CPU rehearsal), and so does inductor's cache, which every stage then shares
        tmp = work / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)}
        # called after every stage: the report on disk is always current, so a call killed at the
        # device's limit still brings back every finished stage
        self.on_stage: Callable[[], None] = lambda: None
        self.procs: List[subprocess.Popen] = []  # every process started (stages, background data)
        self._launching, self._stopping = False, 0
        self.min_stage_s = MIN_STAGE_S
        self.current: Optional[Dict[str, Any]] = None  # the stage running now (stop() records it)

    def _interrupt(self, proc: subprocess.Popen) -> int:
        """A stage past its timeout: SIGINT to its group first, so it can leave what it has (pytest
        writes its JUnit XML of the tests run so far; bench's report on disk already holds every
        finished measurement), SIGKILL after GRACE_S. Returns the exit status."""
        try:
            os.killpg(proc.pid, signal.SIGINT)
            return proc.wait(timeout=GRACE_S)
        except ProcessLookupError:
            return proc.wait()
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return proc.wait()

    def spawn(self, cmd: List[str], **kwargs: Any) -> subprocess.Popen:
        """Popen in a session of its own (a timeout kills its whole group), remembered for stop().

        The stage starts with SIGINT at its default: a process started as a background job of a
        non-interactive shell (`cmd &`, as a tool may launch this script) ignores SIGINT, children
        inherit that, and a Python child then installs no KeyboardInterrupt handler, so _interrupt's
        SIGINT would be lost and every timed-out stage killed without writing what it has (seen: the
        suite run as `(make test &)` failed tests/test_gpu_check.py's timeout test on exactly this;
        main() catches SIGINT itself, which exec resets to the default, but a Runner need not be
        made by main())."""
        self._launching = True
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, preexec_fn=_default_sigint, **kwargs)
            self.procs.append(proc)
        finally:
            self._launching = False
        if self._stopping:  # the signal came while Popen ran: the new process exists only now
            self.stop(self._stopping, None)
        return proc

    def stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT (a `timeout` at the device's limit, Ctrl-C): the processes started here
        run in sessions of their own, so they would outlive this script (and keep the GPU busy)
        unless killed here."""
        self._stopping = signum
        if self._launching:  # spawn() calls back once Popen has returned
            return
        for proc in self.procs:
            if proc.poll() is None:
                _kill_group(proc)
        cur, self.current = self.current, None
        if cur is not None:  # its record and the report on disk: what it had written is kept
            try:
                rec = {"status": "killed", "signal": signal.Signals(signum).name,
                       "seconds": round(time.time() - cur["start"], 1), "timeout_s": cur["timeout_s"],
                       "cmd": cur["cmd"], "log_tail": tail(cur["log"], 25)}
                if cur["result"] is not None:
                    rec["result"] = cur["result"]()
                print(f"[gpu_check] {cur['name']}: killed ({rec['signal']}, {rec['seconds']} s)", flush=True)
                self.record(cur["name"], rec)
            except Exception as err:  # noqa: BLE001 - the exit must not wait on the report
                print(f"[gpu_check] could not record the killed stage: {err}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def record(self, name: str, rec: Dict[str, Any]) -> Dict[str, Any]:
        self.stages[name] = rec
        self.on_stage()
        return rec

    def skip(self, name: str, reason: str) -> Dict[str, Any]:
        print(f"[gpu_check] {name}: skipped ({reason})", flush=True)
        return self.record(name, {"status": "skipped", "reason": reason})

    def run(self, name: str, cmd: List[str], timeout: float, result: Optional[Callable[[], Any]] = None,
            env: Optional[Dict[str, str]] = None, min_s: Optional[float] = None) -> Dict[str, Any]:
        """Run `cmd` as stage `name` (with `env` added to the stages' environment); `result()`
        (parsing the stage's output file) fills rec["result"]. Skipped if less than `min_s`
        (default min_stage_s) of the budget is left."""
        t = min(timeout, self.left())
        if t < (self.min_stage_s if min_s is None else min_s):
            return self.skip(name, f"out of time: {max(0.0, self.left()):.0f} s of the budget left")
        log = self.logs / f"{name}.log"
        print(f"[gpu_check] {name}: {shlex.join(cmd)} (timeout {t:.0f} s)", flush=True)
        start = time.time()
        self.current = {"name": name, "start": start, "timeout_s": round(t), "cmd": cmd, "log": log,
                        "result": result}
        with open(log, "w") as f:
            proc = self.spawn(cmd, env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=t)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                rc, status = self._interrupt(proc), "timeout"
            _kill_group(proc)  # what the stage left running (DataLoader workers, a torchrun child)
        self.current = None
        rec = {"status": status, "rc": rc, "seconds": round(time.time() - start, 1), "timeout_s": round(t),
               "cmd": cmd, "log_tail": tail(log, 25)}
        if result is not None:
            rec["result"] = result()
        print(f"[gpu_check] {name}: {status} (rc {rc}, {rec['seconds']} s)", flush=True)
        return self.record(name, rec)


def _default_sigint() -> None:
    """In the forked child, before exec: SIGINT back to its default disposition (exec keeps an
    ignored signal ignored). preexec_fn runs Python in the child, unsafe only while other threads
    run in the parent: gpu_check starts none."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to the process group of `proc` (a stage: its session), if any of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is gone already (e.g. it ended between poll() and here)
        pass


def tail(path: Path, n: int) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def load_json(path: Path) -> Optional[Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def machine_info(py: str) -> Dict[str, Any]:
    info: Dict[str, Any] = {"cpu_count": os.cpu_count()}
    try:  # the torch loader's workers hand batches over in /dev/shm (data_torch.fit_prefetch)
        du = shutil.disk_usage("/dev/shm")
        info["dev_shm_mb"] = {"total": round(du.total / 2**20), "free": round(du.free / 2**20)}
    except OSError:
        info["dev_shm_mb"] = None
    try:
        info["mem_total_mb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20)
    except (OSError, ValueError):
        info["mem_total_mb"] = None
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = q.stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    code = ("import json, sys, torch\nout = {'python': sys.version.split()[0], 'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() "
            "else None}\n"
            "for m in ('timm', 'nvidia.dali', 'torchvision'):\n"
            "    try:\n        out[m] = __import__(m, fromlist=['x']).__version__\n"
            "    except Exception:\n        out[m] = None\n"
            # what torch.compile lacks here to build Triton's launchers ('ok' when nothing)
            "try:\n    from fast_ressl.compiling import toolchain_problem\n"
            "    out['compile_toolchain'] = toolchain_problem('cuda') or 'ok'\n"
            "except Exception as e:\n    out['compile_toolchain'] = f'unknown: {e}'\n"
            "print(json.dumps(out))")
    try:
        q = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120)
        info["versions"] = json.loads(q.stdout) if q.returncode == 0 else {"error": q.stderr[-500:]}
    except subprocess.TimeoutExpired:  # the stages still run; the report says what is unknown
        info["versions"] = {"error": "the versions probe (import torch, timm, DALI) took over 120 s"}
    return info


def cuda_available(py: str) -> Optional[str]:
    """None if torch sees a CUDA device, else why not."""
    q = subprocess.run([py, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"],
                       capture_output=True, text=True)
    if q.returncode == 0:
        return None
    if q.returncode == 3:
        return "torch.cuda.is_available() is False (no CUDA device or driver)"
    return f"torch could not be imported: {q.stderr.strip().splitlines()[-1:] or q.returncode}"


# ----------------------------------------------------------------------------- stages
def start_data(py: str, work: Path, images: int, parallel: int, runner: Runner) -> Dict[str, Any]:
    """make-bench-data in `parallel` background processes (seeds 0..parallel-1, images split)."""
    parts = work / "parts"
    shutil.rmtree(parts, ignore_errors=True)
    shutil.rmtree(work / "jpegs", ignore_errors=True)
    parallel = max(1, min(parallel, images))
    procs = []
    for k in range(parallel):
        n = images * (k + 1) // parallel - images * k // parallel
        log = open(work / "logs" / f"data_{k}.log", "w")
        procs.append((runner.spawn([py, "-m", "fast_ressl", "make-bench-data", str(parts / f"p{k}"),
                                    "--images", str(n), "--seed", str(k)], env=runner.env, stdout=log,
                                   stderr=subprocess.STDOUT), log))
    return {"procs": procs, "start": time.time(), "parts": parts}


def finish_data(job: Dict[str, Any], work: Path, runner: Runner, timeout: float) -> Optional[Path]:
    """Wait for the make-bench-data parts and merge them into work/jpegs/<class>/ (file names get
    the part's prefix); returns the root, or None (recorded) if a part failed or ran out of time."""
    status, rcs = "ok", []
    for proc, log in job["procs"]:
        left = min(timeout - (time.time() - job["start"]), runner.left())
        try:
            rcs.append(proc.wait(timeout=max(1.0, left)))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rcs.append(proc.wait())
            status = "timeout"
        log.close()
    if status == "ok" and any(rcs):
        status = "failed"
    rec: Dict[str, Any] = {"status": status, "rcs": rcs, "seconds": round(time.time() - job["start"], 1)}
    root = work / "jpegs"
    if status == "ok":
        stats = [load_json(p / "stats.json") for p in sorted(job["parts"].iterdir())]
        for part in sorted(job["parts"].iterdir()):
            for cls in sorted(d for d in part.iterdir() if d.is_dir()):
                (root / cls.name).mkdir(parents=True, exist_ok=True)
                for f in cls.iterdir():
                    f.rename(root / cls.name / f"{part.name}_{f.name}")
        n = sum(s["images"] for s in stats if s)
        rec["stats"] = {"images": n, "parts": stats,
                        "mean_kb": sum(s["mean_kb"] * s["images"] for s in stats if s) / max(1, n),
                        "mean_width": sum(s["mean_width"] * s["images"] for s in stats if s) / max(1, n),
                        "mean_height": sum(s["mean_height"] * s["images"] for s in stats if s) / max(1, n)}
    else:
        rec["log_tail"] = tail(work / "logs" / "data_0.log", 15)
    print(f"[gpu_check] data: {status} ({rec['seconds']} s)", flush=True)
    runner.record("data", rec)
    return root if status == "ok" else None


def dali_stage(py: str, runner: Runner, sums: Path) -> bool:
    """True if DALI (and omegaconf, which the GPU image lacks too) is importable at the end."""
    check = [py, "-c", "import nvidia.dali, omegaconf"]
    if subprocess.run(check, capture_output=True).returncode == 0:
        runner.record("dali", {"status": "ok", "note": "already installed"})
        return True
    if not sums.exists():
        runner.skip("dali", f"DALI or omegaconf not importable and no carried parts ({sums} missing): "
                            "see benchmarks/gpu_carry.sh; loader and e2e benches are skipped")
        return False
    runner.run("dali", [py, str(REPO / "benchmarks" / "gpu_install.py"), "--sums", str(sums),
                        "--parts-dir", "/tmp/dali-parts"], timeout=240)
    return subprocess.run(check, capture_output=True).returncode == 0


def pytest_summary(xml_path: Path) -> Optional[Dict[str, Any]]:
    """Counts and outcome per test from pytest's JUnit XML."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests = []
    for case in suite.iter("testcase"):
        if case.get("name") is None:  # the test a SIGINT (a stage timeout) interrupted: pytest
            tests.append({"test": "(interrupted)", "outcome": "interrupted",  # writes an empty entry
                          "seconds": float(case.get("time") or 0), "message": "stage timed out"})
            continue
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                msg = (el.get("message") or "")[:300]
                break
        else:
            msg = ""
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": msg})
    count = {k: sum(1 for t in tests if t["outcome"] == k)
             for k in ("passed", "failed", "error", "skipped", "interrupted")}
    return {**count, "tests": tests}


def gpu_test_files() -> List[str]:
    """tests/*.py, the DALI pipeline's first: its GPU tests (mixed decode, the hardware decoder) run
    before the ones that compile networks, so a stage cut by its timeout has checked the decoder."""
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    first = "tests/test_pipelines_dali.py"
    return [first, *(f for f in files if f != first)] if first in files else files


def pytest_parallel_args(py: str, cpus: Optional[int] = None) -> List[str]:
    """pytest-xdist options for the GPU tests: one worker per 4 CPU cores, at most 4 (the GPU image
    has pytest-xdist; [] where it is missing or there are fewer than 8 cores). Most of those tests'
    time is on the CPU: inductor and Triton compiling (each compile test twice: default and CUDA
    graphs), DALI building pipelines, subprocess runs starting CUDA; one after another they may not
    fit the stage's 240 s. Each worker is its own process with its own CUDA context (~0.5 GB of
    139), sync-debug mode and allocator statistics, so no test sees another's."""
    n = min(4, (cpus if cpus is not None else os.cpu_count() or 1) // 4)
    if n < 2 or subprocess.run([py, "-c", "import xdist"], capture_output=True).returncode != 0:
        return []
    return ["-n", str(n)]


def run_overrides(a: argparse.Namespace, model: str) -> List[str]:
    """The run every stage measures: backbone, batch, precision and view sizes."""
    return [f"model.backbone={model}", f"train.batch_size={a.batch}", f"train.precision={a.precision}",
            f"data.weak={{size: {a.size}}}", f"data.strong=[{{size: {a.size}}}]"]


def bench_cmd(py: str, model: str, a: argparse.Namespace, data: Optional[Path], threads: int,
              out: Path, loader_mode: bool) -> List[str]:
    """The loader mode runs for the first model only: it measures the data pipeline alone, the same
    for every backbone (same views, batch and threads); so does `--ablate augment` (the loader and
    e2e without the student view's colour/blur ops), which tells a decoder from an augmentation bound."""
    modes = ("loader,step,e2e" if loader_mode else "step,e2e") if data is not None else "step"
    cmd = [py, "-m", "fast_ressl", "bench", "-", *run_overrides(a, model),
           f"data.num_threads={threads}", f"run.device={a.device}", "--modes", modes, "--warmup", str(a.warmup),
           "--iters", str(a.iters), "--repeats", str(a.repeats), "--out", str(out)]
    if loader_mode and data is not None:  # decoder- or augmentation-bound: the loader without colour/blur
        cmd += ["--ablate", "augment"]
    return cmd + (["--data", str(data)] if data is not None else [])


# ----------------------------------------------------------------------------- report
def _fmt(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def bench_rows(model: str, report: Dict[str, Any]) -> List[List[str]]:
    by = {r["variant"]: r["results"] for r in report.get("runs", [])}
    rows = []
    for mode in report.get("settings", {}).get("modes", []):
        fast, ref = by.get("fast", {}).get(mode, {}), by.get("reference", {}).get(mode, {})
        ratio = report.get("ratios", {}).get("fast", {}).get(mode)
        ops = (f"{fast['ops_per_step']} ({fast['bookkeeping_ops']})" if "ops_per_step" in fast else "-")
        ref_ops = (f"{ref['ops_per_step']} ({ref['bookkeeping_ops']})" if "ops_per_step" in ref else "-")
        wait = fast.get("data_wait_fraction", {}).get("median")
        mem = (f"{fast['peak_memory_mb']:.0f}+{fast.get('outside_torch_mb', 0):.0f}"
               if "peak_memory_mb" in fast else (f"+{fast['outside_torch_mb']:.0f}" if "outside_torch_mb" in fast
                                                 else "-"))
        tb = fast.get("time_breakdown") or {}
        nets, busy = tb.get("networks_share"), tb.get("device_busy_fraction")
        rows.append([model, mode, _fmt(fast.get("median")), _fmt(ref.get("median")),
                     _fmt(ratio, ".2f") + ("x" if ratio else ""), ops, ref_ops,
                     "-" if wait is None else f"{100 * wait:.1f}%", mem,
                     str(fast.get("epoch_boundaries_timed", "-")),
                     "-" if nets is None else f"{100 * nets:.0f}%", "-" if busy is None else f"{100 * busy:.0f}%"])
    return rows


def table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _cudagraphs(step: Dict[str, Any]) -> str:
    """bench's per-run CUDA-graph report (model.compile_mode=reduce-overhead on CUDA) in a few words."""
    cg = step["cudagraphs"]
    n = cg.get("graphs_without_cudagraphs", 0)
    return "all captured" if not n else f"{n} graph(s) without ({'; '.join(cg.get('reasons', []))[:160]})"


def free_port() -> int:
    """A free TCP port on loopback (torchrun's rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_result(ddp: Optional[Dict[str, Any]], plain: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The ddp stage: its fast step (images/s, process group, ops per step) and the ratio to the
    plain fast step of the same model's bench (None where that bench did not run)."""
    step = _medians(ddp or {}, "fast").get("step")
    if step is None:
        return None
    res = _fast_result(ddp, "step")
    base = _medians(plain or {}, "fast").get("step")
    return {"step": step, "process_group": res.get("process_group"), "ops_per_step": res.get("ops_per_step"),
            "teacher_bn": res.get("teacher_bn"), "plain_step": base, "vs_plain": round(step / base, 3) if base else None, "report": ddp}


def stage_result(name: str, rec: Dict[str, Any]) -> str:
    res = rec.get("result")
    if rec.get("status") == "skipped":
        return rec.get("reason", "")
    if rec.get("note"):  # dali: "already installed" (a warm machine's second call)
        return rec["note"]
    if name == "data" and rec.get("stats"):
        s = rec["stats"]
        return f"{s['images']} JPEGs, {s['mean_width']:.0f}x{s['mean_height']:.0f} px, {s['mean_kb']:.0f} KB"
    if name == "pytest" and res:
        return (f"{res['passed']} passed, {res['failed']} failed, {res['error']} errors, {res['skipped']} skipped"
                + (", 1 interrupted by the timeout (the rest did not run)" if res.get("interrupted") else ""))
    if name == "sync" and res:
        return (f"{res['syncs_per_step']} host syncs/step ({res['steps_counted']} non-log steps); "
                f"log steps {res['log_syncs']}, side threads {res['side_thread_syncs']}")
    if name == "resume" and res:
        ctl = "" if "repeatable" not in res else (
            ", control run bit-identical" if res["repeatable"] else
            f", control run NOT bit-identical (max loss diff {res['control']['max_loss_diff']})")
        return (f"{'OK' if res.get('ok') else 'FAILED'} ({res.get('criterion', 'bitwise')}): killed at step "
                f"{res.get('killed_at_step')}, {len(res.get('tensors_differ', []))}/{res.get('tensors_compared')} "
                f"tensors differ, losses equal {res.get('losses_equal')}{ctl}"
                + (f"; {res['error'][:120]}" if res.get("error") else ""))
    if name == "tune_e2e" and res and res.get("sweep", {}).get("best", {}).get("e2e"):
        b = res["sweep"]["best"]["e2e"]
        vs = f", {b['vs_fast']:.2f}x the bench's settings" if b.get("vs_fast") else ""
        return f"{res['settings']['overrides'][0]} e2e: fastest {b['variant']}: {b['median']:.0f} images/s{vs}"
    if name == "tune_loader" and res and res.get("sweep", {}).get("best", {}).get("loader"):
        b = res["sweep"]["best"]["loader"]
        vs = f", {b['vs_fast']:.2f}x the bench's settings" if b.get("vs_fast") else ""
        return f"fastest {b['variant']}: {b['median']:.0f} images/s, {b['vs_slowest']:.2f}x the slowest point{vs}"
    if name == "ddp" and res:
        vs = f", {res['vs_plain']:.2f}x the plain fast step" if res.get("vs_plain") else ""
        bn = f", teacher BN {res['teacher_bn']}" if res.get("teacher_bn") else ""
        return f"step under DDP ({res['process_group']}, one rank{bn}): {res['step']:.0f} images/s{vs}"
    if name == "tune_step" and res and res.get("sweep", {}).get("best", {}).get("step"):
        b = res["sweep"]["best"]["step"]
        return (f"{b['variant']}: {b['median']:.0f} images/s, {b.get('vs_fast', float('nan')):.2f}x the fast default"
                + "".join(f"; {r['variant'].split('compile_mode=')[-1]}: CUDA graphs " + _cudagraphs(r["results"]["step"])
                          for r in res.get("runs", []) if "cudagraphs" in r["results"].get("step", {})))
    if name.startswith("bench_") and res:
        return (f"report {len(res.get('runs', []))} variants x {len(res.get('settings', {}).get('modes', []))} modes"
                + (" (partial: the runs finished before the stage stopped)" if res.get("complete") is False else ""))
    return (rec.get("log_tail") or [""])[-1][:140]


def main(argv: Optional[List[str]] = None) -> int:
    t_start = time.time()
    a = parse_args(argv)
    py = sys.executable
    why = cuda_available(py) if a.device == "cuda" else None
    if why is not None:
        print(f"gpu_check: no CUDA here: {why}. This check runs on a lent GPU machine (see the README's "
              "'GPU check'); nothing was run.", file=sys.stderr)
        return 2
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    # where gpu_install.py unpacks the carry if this Python's site-packages cannot be written: on
    # the path of every process started from here (stages, import checks, the versions probe)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(FALLBACK_TARGET), os.environ.get("PYTHONPATH")]))
    runner = Runner(work, a.budget, t0=t_start)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, runner.stop)
    skip = set(filter(None, a.skip.split(",")))
    threads = a.threads or max(2, min(12, (os.cpu_count() or 8) - 4))
    models = [m for m in a.models.split(",") if m]
    main_model = models[0] if models else MODELS[0]  # the sync check's and the tuning stages'
    info: Dict[str, Any] = {}
    runner.on_stage = lambda: write_report(a, argv, runner, info, out, work, models, threads)
    if "dali" in skip:  # no install; use DALI if it is there
        have_dali = subprocess.run([py, "-c", "import nvidia.dali"], capture_output=True).returncode == 0
    else:
        have_dali = dali_stage(py, runner, Path(a.dali_sums))
    q = subprocess.run([py, "-c", "import omegaconf"], capture_output=True, text=True)
    if q.returncode != 0:  # fast_ressl's config: every later stage would fail on it, minutes of them
        print("gpu_check: omegaconf cannot be imported after the dali stage (it comes with the carried parts: "
              f"{(q.stderr.strip().splitlines() or ['?'])[-1]}); every later stage needs it, so nothing else "
              "was run. If the machine went back between the carry calls, its parts are gone: make the "
              "carry calls again, back to back, then this one", file=sys.stderr)
        write_report(a, argv, runner, info, out, work, models, threads)
        return 2
    # after the install: make-bench-data imports fast_ressl's config, i.e. omegaconf, which the GPU
    # image gets from the carried parts too. CPU work, in the background while pytest runs.
    data_job = start_data(py, work, a.images, a.parallel, runner)
    info.update(machine_info(py))  # after the DALI install: its version
    if "pytest" not in skip:
        xml = work / "pytest_gpu.xml"
        runner.run("pytest", [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                              *(["-k", a.pytest_k] if a.pytest_k else []),
                              *pytest_parallel_args(py), *gpu_test_files(), f"--junitxml={xml}"],
                   timeout=240, result=lambda: pytest_summary(xml))
    data = finish_data(data_job, work, runner, timeout=150)
    bench_data = data if have_dali else None  # no DALI: step mode only

    def bench(model: str, first: bool) -> None:
        rep = out / f"bench_{model}.json"  # written as it measures: a kill keeps what is finished
        rep.unlink(missing_ok=True)  # an --out used before must not lend this stage an old report
        runner.run(f"bench_{model}", bench_cmd(py, model, a, bench_data, threads, rep, first),
                   timeout=BENCH_TIMEOUT_S["first" if first else "other"], result=lambda: load_json(rep),
                   min_s=STAGE_MIN_S["bench"])

    # the main model's bench and its host syncs per step, the other models' benches (RESULTS.md's
    # figures), then the CLI kill -9 + resume check (pytest -m gpu has already run one on synthetic
    # data: test_gpu_kill9_then_resume_is_bitwise_exact)
    # the loader mode (the pipeline alone, the same for every backbone) rides with the first model
    # whose bench runs: a later call that skips the main model's bench (--skip bench_resnet50) still
    # measures it, so every model's bound can be named
    benched = [m for m in models if not skip & {"bench", f"bench_{m}"}]
    if benched and benched[0] == models[0]:
        bench(models[0], True)
    if "sync" not in skip:
        sj = work / "sync.json"
        cmd = [py, str(REPO / "benchmarks" / "gpu_sync_check.py"), "-", *run_overrides(a, main_model),
               f"data.num_threads={threads}", "--steps", str(a.sync_steps), "--log-every", "10",
               "--device", a.device, "--out", str(sj)]
        cmd += ["--data", str(bench_data)] if bench_data is not None else []
        runner.run("sync", cmd, timeout=100, result=lambda: load_json(sj))
    for model in benched:
        if model != models[0]:
            bench(model, model == benched[0])
    if "resume" not in skip:
        rj = work / "resume.json"
        runner.run("resume", [py, str(REPO / "benchmarks" / "gpu_resume_check.py"), "--work",
                              str(work / "resume"), "--device", a.device, "--out", str(rj)], timeout=150,
                   result=lambda: load_json(rj), min_s=STAGE_MIN_S["resume"])
    def tune(stage: str, model: str, mode: str, presets: str, grid: List[str], overrides: List[str],
             timeout: float, min_s: Optional[float] = None) -> None:
        """A sweep stage: `bench --sweep` of `model` in `mode` over `grid`; its report under --out as
        <stage>.json. With presets '' the grid's point that is the fast config itself (this run's
        settings) is measured once and compared with (vs_fast)."""
        rep = out / f"{stage}.json"
        rep.unlink(missing_ok=True)
        cmd = [py, "-m", "fast_ressl", "bench", "-", *run_overrides(a, model), *overrides, f"run.device={a.device}",
               "--presets", presets, "--modes", mode, "--warmup", str(a.warmup), "--iters", str(a.iters),
               "--repeats", "2", "--out", str(rep)]
        cmd += ["--data", str(bench_data)] if mode != "step" else []
        for item in grid:
            cmd += ["--sweep", item]
        runner.run(stage, cmd, timeout=timeout, result=lambda: load_json(rep), min_s=min_s)

    if not skip & {"tune", "tune_step"}:  # the step: compiled or not x bf16 or fp16 (TUNE_STEP)
        tune("tune_step", main_model, "step", "", a.tune_step, [], 240, STAGE_MIN_S["tune_step"])
    # the sweeps below read the JPEGs through DALI: without them each is recorded as skipped with
    # the reason, so that the summary's later-call command still names it (they vanished from the
    # report before)
    no_jpegs = ("no JPEGs to read: the data stage failed or timed out" if have_dali
                else "DALI is not importable")
    if not skip & {"tune", "tune_e2e"}:
        # the last model end to end over DALI threads x hw_decoder_load: where the loader slows the
        # step beside it (the small backbones on the first H200 run), the loader alone is the wrong
        # thing to tune; fewer threads free CPU, more hardware decoding frees SMs
        if bench_data is None:
            runner.skip("tune_e2e", no_jpegs)
        else:
            tune("tune_e2e", models[-1] if models else main_model, "e2e", "", a.tune_e2e,
                 [f"data.num_threads={threads}"], 150, STAGE_MIN_S["bench"])
    if not skip & {"tune", "tune_loader"}:
        # the loader alone over a grid of DALI settings (issue 11's tuning): after tune_step and
        # tune_e2e, since on the first H200 run the loader alone made 4x what the ResNet-50 step
        # used, and where the loader does hold the small backbones back it is end to end.
        # (train.precision rides along with the run's overrides: the loader's output is data.dtype)
        # At the run's threads, and without the fast preset: the grid's own point at the run's
        # settings stands for it (vs_fast) instead of being measured twice.
        if bench_data is None:
            runner.skip("tune_loader", no_jpegs)
        else:
            tune("tune_loader", main_model, "loader", "", a.tune, [f"data.num_threads={threads}"], 150)
    if "ddp" not in skip:
        # last, the first to go when time runs out: not one of issue 11's asks, but the first figure
        # a user planning a multi-GPU run wants
        dj = work / "ddp.json"
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "fast_ressl", "bench", "-", *run_overrides(a, main_model),
               f"run.device={a.device}", "--presets", "fast", "--modes", "step", "--warmup", str(a.warmup),
               "--iters", str(a.iters), "--repeats", "2", "--out", str(dj)]
        runner.run("ddp", cmd, timeout=150, result=lambda: ddp_result(load_json(dj), load_json(
            out / f"bench_{main_model}.json")), env={"FAST_RESSL_DDP_ONE_RANK": "1"})
    report = write_report(a, argv, runner, info, out, work, models, threads)
    return print_summary(a, runner, info, out, models, report)


def write_report(a: argparse.Namespace, argv: Optional[List[str]], runner: Runner, info: Dict[str, Any],
                 out: Path, work: Path, models: List[str], threads: int) -> Dict[str, Any]:
    """gpu_check.json, gpu_check.log and the stage reports under `out`, as they stand now."""
    report = {"schema": "fast_ressl.gpu_check/1", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": ["bash", "benchmarks/gpu_check.sh", *(argv if argv is not None else sys.argv[1:])],
              "machine": info, "settings": dict(vars(a)), "threads": threads,
              "wall_s": round(time.time() - runner.t0, 1), "bounds": bounds(bench_reports(runner, models), models),
              "stages": runner.stages}
    report["targets"] = targets(bench_reports(runner, models), models, report["bounds"])
    report["next_call"] = next_call(a, report["command"][2:], runner)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "gpu_check.log", "w") as f:
        for name in runner.stages:  # in the order they ran (or were skipped)
            f.write(f"===== {name}\n" + "\n".join(tail(runner.logs / f"{name}.log", 200)) + "\n")
    return report


def next_call(a: argparse.Namespace, args: List[str], runner: Runner) -> Dict[str, Any]:
    """What a later call (a fresh machine: DALI carried again) has left to run, and its command: this
    call's arguments with --skip naming every stage that passed here or was skipped by request.
    `left`: the stages skipped for time, failed or timed out (dali and data are never skipped:
    a fresh machine needs both)."""
    left = [n for n, r in runner.stages.items() if n not in ("dali", "data") and r.get("status") != "ok"]
    done = [n for n, r in runner.stages.items() if n not in ("dali", "data") and r.get("status") == "ok"]
    skip = [n for n in a.skip.split(",") if n and n != "dali" and n not in done] + done
    keep, i = [], 0
    while i < len(args):  # this call's arguments without its --skip
        if args[i] == "--skip":
            i += 2
            continue
        if not args[i].startswith("--skip="):
            keep.append(args[i])
        i += 1
    # quoted: a --pytest-k expression has spaces ("a or b")
    cmd = shlex.join(["bash", "benchmarks/gpu_check.sh", *keep] + (["--skip", ",".join(skip)] if skip else []))
    return {"left": left, "command": cmd if left else None}


def _fast_result(report: Dict[str, Any], mode: str) -> Dict[str, Any]:
    """The fast variant's result for `mode` in a bench report ({} where it has none)."""
    return next((r["results"].get(mode, {}) for r in report.get("runs", []) if r["variant"] == "fast"), {})


def _medians(report: Dict[str, Any], variant: str) -> Dict[str, float]:
    """{mode: median images/s} of one variant of a bench report."""
    run = next((r for r in report.get("runs", []) if r["variant"] == variant), {})
    return {m: r["median"] for m, r in run.get("results", {}).items() if "median" in r}


def name_bound(model: str, report: Dict[str, Any], first: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What limits `model`'s end-to-end rate (issue 11: decoder, augmentation or compute), with the
    figures: the step alone (its bench) against the loader alone (the first model's bench: the same
    pipeline for every backbone), and the loader without the student view's colour/blur ops
    (`--ablate augment`) against the full one. None without a step and a loader figure."""
    fast, loader_runs = _medians(report, "fast"), _medians(first, "fast")
    step, e2e, loader = fast.get("step"), fast.get("e2e"), loader_runs.get("loader")
    noaug = _medians(first, "no_augment").get("loader")
    if step is None or loader is None:
        return None
    wait = (_fast_result(report, "e2e").get("data_wait_fraction") or {}).get("median")
    out: Dict[str, Any] = {"model": model, "step": step, "loader": loader, "loader_no_augment": noaug, "e2e": e2e,
                           "data_wait": wait}
    if e2e:  # issue 11's target for the small backbones: >= 0.9
        out["e2e_vs_min_alone"] = round(e2e / min(step, loader), 3)
    # the step alone outruns the loader alone, yet end to end runs well under the step
    slowed = step <= loader and e2e and wait is not None and e2e < SMALL_TARGET * step
    if slowed and wait <= WAIT_TARGET:
        # The loader keeps up (the step hardly waits for a batch) and yet the step runs slower than
        # alone: the loader's work beside it (its kernels on the same GPU, its threads on the same
        # CPU) slows the step itself. Seen on the first H200 run: efficientnet_b0 e2e 0.77x and
        # mobilenetv3 0.65x their steps alone with 1.2-1.4% data wait, close to (or below) the
        # rate of the two run one after the other, 1 / (1/step + 1/loader).
        serial = 1.0 / (1.0 / step + 1.0 / loader)
        out["bound"] = "compute shared with the loader"
        out["evidence"] = (f"step alone {step:.0f} <= loader alone {loader:.0f} images/s, but e2e {e2e:.0f} is "
                           f"{e2e / step:.2f}x the step alone at {wait:.1%} data wait; step and loader in "
                           f"series would give {serial:.0f}")
        fast_loader = _fast_result(first, "loader")
        if fast_loader.get("loader_gpu_share") is not None:  # what the loader's own kernels take
            out["loader_gpu_share"] = fast_loader["loader_gpu_share"]
            out["evidence"] += (f"; the loader alone keeps the GPU {fast_loader['loader_gpu_share']:.0%} busy "
                                f"({fast_loader['loader_gpu_ms_per_batch']:.1f} ms of kernels and copies per batch)")
    elif slowed:
        # the step waits for batches end to end although the loader alone outruns the step: the
        # loader slows when the step runs beside it
        out["bound"] = "data (the loader slowed beside the step)"
        out["evidence"] = (f"step alone {step:.0f} <= loader alone {loader:.0f} images/s, but e2e {e2e:.0f} "
                           f"waits {wait:.1%} of its time for batches")
    elif step <= loader:
        out["bound"] = "compute"
        out["evidence"] = f"step alone {step:.0f} <= loader alone {loader:.0f} images/s"
    elif noaug is None:
        out["bound"] = "data"
        out["evidence"] = f"loader alone {loader:.0f} < step alone {step:.0f} images/s (no --ablate augment figure)"
    else:
        # 10%: a margin for run-to-run noise (not measured on a GPU yet: each report gives the
        # loader runs' spread, to check the margin against); below it the colour/blur ops are not
        # taken to be what holds the pipeline back
        out["bound"] = "augmentation" if noaug > 1.1 * loader else "decoder"
        out["evidence"] = (f"loader alone {loader:.0f} < step alone {step:.0f} images/s; without the student "
                           f"view's colour/blur ops {noaug:.0f} ({noaug / loader:.2f}x)")
    shared = what_is_shared(_fast_result(report, "step"), _fast_result(report, "e2e")) if slowed else None
    if shared:  # the step slowed beside the loader: what the two share, from the e2e profile
        out["shared"] = shared["shared"]
        out["evidence"] += "; " + shared["evidence"]
    return out


# A mechanism is named when its share of the profiled e2e step (or the step kernels' growth over the
# step alone) passes this: a margin for what torch.profiler itself adds to a profiled step (CUPTI's
# per-kernel records; not measured on a GPU yet: each report gives the profiled window per step
# beside the timed step, to check it against).
SHARED_MARGIN = 0.10


def what_is_shared(step: Dict[str, Any], e2e: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """What the step shares with the loader end to end, from the e2e result's device timeline
    (`gpu_timeline`) and host CPU (`host_cpu`) against the step alone's kernel time
    (`time_breakdown.kernel_ms_per_step`): a list of
    - "SMs": the step's own kernels run > SHARED_MARGIN longer beside the loader's;
    and, where the step's streams sit idle > SHARED_MARGIN of the profiled step (its gaps: the
    loader's work alone, or nothing at all, running):
    - "the loader's batch on the device": the loader's kernels fill the step's gaps far more than
      chance would (more than halfway from the loader's busy share of the step to all of them): the
      step waits on the loader's event, or the two serialize;
    - "the host" otherwise: gaps the loader's kernels do not explain; the host CPU figures say
      whether the loop's thread is saturated. (The hardware JPEG decoder's work is no kernel and
      not in the timeline: a step waiting on it also reads as gaps the loader's kernels do not
      fill, hence "the host" is a reading, not a proof.)
    with the figures as `evidence`. None without a timeline."""
    tl = e2e.get("gpu_timeline") or {}
    if "training_kernel_ms" not in tl:
        return None
    window = tl["window_ms_per_step"]
    alone = (step.get("time_breakdown") or {}).get("kernel_ms_per_step")
    shared, parts = [], []
    if alone:
        growth = tl["training_kernel_ms"] / alone - 1
        parts.append(f"the step's kernels take {tl['training_kernel_ms']:.1f} ms per step beside the loader "
                     f"against {alone:.1f} alone ({growth:+.0%})")
        if growth > SHARED_MARGIN:
            shared.append("SMs")
    gaps = tl["training_idle_while_loader_ms"] + tl["idle_ms"]  # = window - the step's busy time
    parts.append(f"the loader's kernels {tl['loader_kernel_ms']:.1f} ms ({tl['overlap_ms']:.1f} ms overlapping "
                 f"the step's); the step's streams idle {gaps:.1f} ms of a {window:.1f} ms profiled step, "
                 f"{tl['training_idle_while_loader_ms']:.1f} ms of it while the loader's kernels run")
    if window > 0 and gaps > SHARED_MARGIN * window:
        covered, chance = tl["training_idle_while_loader_ms"] / gaps, tl["loader_busy_ms"] / window
        parts[-1] += f" ({covered:.0%} of the gaps; the loader runs {chance:.0%} of the step)"
        shared.append("the loader's batch on the device" if covered > (1 + chance) / 2 else "the host")
    cpu = e2e.get("host_cpu") or {}
    if cpu.get("machine_busy_cores") is not None:
        parts.append(f"CPU: {cpu['machine_busy_cores']:.1f} of {cpu.get('machine_cores', cpu['cores'])} cores busy, "
                     f"the loop's thread {cpu['main_thread_cores']:.2f}")
    return {"shared": shared, "evidence": "; ".join(parts)}


def bench_reports(runner: Runner, models: List[str]) -> Dict[str, Dict[str, Any]]:
    """{model: its bench stage's report ({} where none)}."""
    return {m: runner.stages.get(f"bench_{m}", {}).get("result") or {} for m in models}


def bounds(by_model: Dict[str, Dict[str, Any]], models: List[str]) -> List[Dict[str, Any]]:
    """Each model's bound (name_bound) from {model: bench report}, in `models`' order."""
    reports = [by_model.get(m) or {} for m in models]
    # the loader figures: from the first bench that measured the loader mode
    first = next((r for r in reports if _medians(r, "fast").get("loader") is not None), {})
    found = [name_bound(m, r, first) for m, r in zip(models, reports)]
    return [b for b in found if b is not None]


# Issue 11's targets (measured and reported, never asserted): the first model (ResNet-50) end to
# end, its data wait and its speed-up over the reference preset in the same run; every other model
# end to end within 10% of min(loader alone, step alone).
E2E_TARGET, E2E_MOONSHOT, WAIT_TARGET, VS_REF_TARGET, SMALL_TARGET = 3500.0, 5000.0, 0.03, 3.0, 0.9


def targets(by_model: Dict[str, Dict[str, Any]], models: List[str],
            found_bounds: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per target from {model: bench report}: what was measured (None = not measured) and
    whether it is met."""
    if not models:
        return []
    first = by_model.get(models[0]) or {}
    e2e = _fast_result(first, "e2e")
    wait = e2e.get("data_wait_fraction", {}).get("median")
    vs_ref = first.get("ratios", {}).get("fast", {}).get("e2e")
    rows = [{"model": models[0], "target": f"e2e >= {E2E_TARGET:.0f} source images/s (moonshot {E2E_MOONSHOT:.0f})",
             "value": e2e.get("median"), "met": None if e2e.get("median") is None else e2e["median"] >= E2E_TARGET},
            {"model": models[0], "target": f"data wait <= {100 * WAIT_TARGET:.0f}%", "value": wait,
             "met": None if wait is None else wait <= WAIT_TARGET},
            {"model": models[0], "target": f"e2e >= {VS_REF_TARGET:.0f}x the reference preset (same run)",
             "value": vs_ref, "met": None if vs_ref is None else vs_ref >= VS_REF_TARGET}]
    by_model = {b["model"]: b for b in found_bounds}
    for m in models[1:]:
        ratio = by_model.get(m, {}).get("e2e_vs_min_alone")
        rows.append({"model": m, "target": f"e2e >= {SMALL_TARGET:.1f} x min(loader alone, step alone)",
                     "value": ratio, "met": None if ratio is None else ratio >= SMALL_TARGET})
    for row, fmt in zip(rows, ["{:.0f} images/s", "{:.1%}", "{:.2f}x"] + ["{:.2f}x"] * (len(rows) - 3)):
        row["shown"] = "-" if row["value"] is None else fmt.format(row["value"])
    return rows


def print_summary(a: argparse.Namespace, runner: Runner, info: Dict[str, Any], out: Path, models: List[str],
                  report: Dict[str, Any]) -> int:
    """The tables, printed last; the exit status."""
    v = info.get("versions", {})
    smi = "; ".join(info["nvidia_smi"]) if isinstance(info.get("nvidia_smi"), list) else ""
    print(f"\nGPU check: {v.get('gpu')} ({smi}), torch {v.get('torch')}, DALI {v.get('nvidia.dali')}, "
          f"timm {v.get('timm')}; batch {a.batch}, {a.size} px, {a.precision}; {report['wall_s']} s; "
          f"JSON in {out / 'gpu_check.json'}")
    rows = [row for m in models for row in bench_rows(m, runner.stages.get(f"bench_{m}", {}).get("result") or {})]
    if rows:
        print("\nimages/s (median), fast vs reference; ops/step (bookkeeping); the fast path's data wait and "
              "memory (torch peak + outside torch, MiB); epoch boundaries inside its timed windows; the fast "
              "step's networks-alone share of its time and the GPU's busy fraction (bench's time_breakdown)")
        print(table(["model", "mode", "fast", "reference", "fast/ref", "ops fast", "ops ref", "wait", "mem MiB",
                     "epoch ends", "nets", "busy"], rows))
    if report.get("bounds"):
        print("\nwhat limits each model end to end (fast path): the step alone vs the loader alone, and the "
              "loader without the student view's colour/blur ops; e2e / min(step, loader)")
        print(table(["model", "bound", "e2e/min", "evidence"],
                    [[b["model"], b["bound"], _fmt(b.get("e2e_vs_min_alone"), ".2f"), b["evidence"]]
                     for b in report["bounds"]]))
    if report.get("targets"):
        print("\nissue 11's targets (reported, not asserted)")
        print(table(["model", "target", "measured", "met"],
                    [[t["model"], t["target"], t["shown"], {True: "yes", False: "NO", None: "not measured"}[t["met"]]]
                     for t in report["targets"]]))
    print()
    print(table(["stage", "status", "seconds", "result"],
                [[n, r.get("status", "?"), _fmt(r.get("seconds"), ".0f"), stage_result(n, r)]
                 for n, r in runner.stages.items()]))
    nxt = report.get("next_call") or {}
    if nxt.get("command"):
        print(f"\nleft for a later call (skipped for time, failed or timed out): {', '.join(nxt['left'])}\n"
              f"that call: {nxt['command']}")
    return 0 if all(r.get("status") == "ok" for r in runner.stages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
