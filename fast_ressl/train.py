"""`fast-ressl train`: set-up in build_* helpers, then the one-screen loop in device order."""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import dist, log
from .checkpoint import CheckpointDir, CheckpointError, RunDirBusy, RunLock, check_complete, safe_load
from .compiling import CUDAGRAPH_MODES, CudagraphSkips, compile_network, toolchain_problem_here, wants_cudagraphs
from .config import RUN_CONTROL_KEYS, Config, ConfigError, config_hash, to_dict, to_yaml
from .data import build_loader
from .datasets import PREPARE_TIMEOUT_S
from .evaluate import knn_monitor
from .dist import Env
from .model import build_student_teacher, convert_sync_bn, ema_pairs, ema_update_, flatten_buffers
from .optim import build_optimizer, materialize_state
from .redact import redact_obj, redact_text
from .ressl import Queue, collapse_indicators, ressl_loss, warmup_mixed_loss
from .schedules import lr_at, momentum_at, relation_weight_at

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConfigMismatch(RuntimeError):
    pass


class Preempted(Exception):
    """A stop signal (dist.STOP_SIGNALS): a checkpoint was written at the step boundary; exit with
    128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.exit_code = 128 + signum


class NonFiniteAbort(RuntimeError):
    pass


def build_env(cfg: Config) -> Env:
    env = dist.init(cfg.run.device, cfg.train.dist_timeout_s)
    device = env.device
    resolve_precision(cfg, device)
    configure_backends(device.type, cfg.train.deterministic)
    check_toolchain(cfg, env)
    if device.type == "cpu" and cfg.train.precision == "bf16" and len({v.size for v in cfg.data.strong}) > 1:
        # Measured with torch 2.14.1: CPU bf16 autocast with student views of several sizes gave
        # run-to-run different losses and occasional NaNs inside oneDNN (gone with oneDNN disabled,
        # which made the step ~25x slower; fp32 is deterministic at about half the bf16 speed).
        log.info("warning: bf16 on CPU with multi-crop views of different sizes is not deterministic "
                 "in oneDNN (occasional NaN); use train.precision=fp32 for such CPU runs")
    # Same seed on every rank: identical initial student, teacher and queue without a broadcast.
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return env


def check_toolchain(cfg: Config, env: Env) -> None:
    """Before any data or model work: model.compile=true (asked for) on a machine without the
    compiler torch.compile needs is a ConfigError naming what is missing; the relation loss
    (method.compile_loss, on by default) then runs eagerly instead (build_loss_fn), said once here:
    the same values, ~10 more small kernels per step, and a run that starts without a compiler
    resumes alike once one is installed (the config, hence its hash, is unchanged)."""
    problem = toolchain_problem_here(env.device.type)
    if problem is None:
        return
    if cfg.model.compile:
        raise ConfigError(f"model.compile=true: {problem}; or set model.compile=false")
    if cfg.method.compile_loss and env.is_main:
        _warn_once(f"warning: method.compile_loss=true: {problem}; the relation loss runs eagerly (same "
                   "values, more kernel launches per step); method.compile_loss=false silences this")


@functools.lru_cache(maxsize=None)
def _warn_once(msg: str) -> None:
    """log.info once per process and message (bench builds an env for every measurement)."""
    log.info(msg)


def resolve_precision(cfg: Config, device: torch.device) -> None:
    """train.precision=auto -> bf16 on CUDA, fp32 elsewhere (end to end on a 2-core CPU, bf16 autocast
    ran at 33 img/s vs fp32's 59: benchmarks/RESULTS.md), written back into cfg: every later reader (the
    loop, bench) sees the concrete value, and an auto run and its resume on the same kind of device
    hash alike."""
    if cfg.train.precision == "auto":
        cfg.train.precision = "bf16" if device.type == "cuda" else "fp32"


def configure_backends(device_type: str, deterministic: bool) -> None:
    """TF32 for the networks' convolutions, full fp32 for every matmul (the relation loss).

    cuDNN's TF32 flag covers convolutions only: >99% of a ResNet/EfficientNet/MobileNet step's
    FLOPs in fp32 runs (in bf16/fp16 runs autocast picks the dtype anyway). cuBLAS TF32 stays off,
    because the loss's logits q @ queue.T / 0.04 would otherwise be computed with TF32's 10-bit
    mantissa (relative error ~1e-3, 25x amplified by the sharpening temperature), forward and
    backward (the backward's matmuls run inside the same .backward() as the networks', so a
    context manager around the loss call could not cover them). The cost: the projector's fp32
    Linear layers (~0.1% of ResNet-50's FLOPs) run without TF32.
    """
    if device_type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = False
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def teacher_bn_policy(cfg: Config, env: Env) -> str:
    policy = cfg.model.teacher_bn
    if policy == "auto":  # several ranks: the original recipe; one rank: shuffle only for BN groups
        policy = "shuffle" if env.distributed or cfg.model.bn_group_size else "local"
    if policy == "sync" and env.device.type != "cuda":
        raise RuntimeError("model.teacher_bn=sync needs CUDA (torch's SyncBatchNorm); use shuffle or local")
    if policy == "sync" and env.world_size > 1 and env.is_main:
        # torch's SyncBatchNorm.forward drops ranks with an empty batch by boolean indexing, a
        # device-to-host sync in every BN layer outside CUDA-graph capture (torch/nn/modules/
        # _functions.py; pytorch#78549): 53 BN layers in a ResNet-50 teacher
        _warn_once("note: model.teacher_bn=sync: torch's SyncBatchNorm waits for the GPU once per BN layer "
                   "per step (53 waits a step for a ResNet-50 teacher); model.teacher_bn=shuffle, the "
                   "default on several ranks, normalises across ranks with no wait")
    return policy


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name


def build_loss_fn(cfg: Config, rank: int = 0, per_rank: int = 0) -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """loss_fn(z_s, z_t, queue, w_host) -> (loss, k_all); compiled unless method.compile_loss=false
    or this machine lacks the compiler torch.compile needs for the queue's device (check_toolchain).

    z_s: (V, N, D) student projections of the strong views; z_t: (world*N, D) teacher projections of
    the global weak batch in rank order; queue: (K, D). Both are L2-normalised here, inside the
    compiled region (one fused kernel instead of ~10 eager ops each), and this rank's keys are rows
    [rank*N, (rank+1)*N) of k_all. Returns the 0-dim float32 loss and k_all (L2-normalised, float32)
    for the queue push. Without an InfoNCE warm-up this is exactly ressl_loss; with one, the mixed
    loss is used while the relation weight w_host (a Python float from the schedule) is below 1; its
    value reaches the compiled graph as a 0-dim tensor, so a changing ramp does not recompile.
    """
    m = cfg.method
    lo, hi = rank * per_rank, (rank + 1) * per_rank

    def relation(z_s, z_t, queue):
        q, k_all = F.normalize(z_s.float(), dim=-1), F.normalize(z_t.float(), dim=-1)
        return ressl_loss(q, k_all[lo:hi] if hi else k_all, queue, m.tau_s, m.tau_t), k_all

    def mixed(z_s, z_t, queue, w):
        q, k_all = F.normalize(z_s.float(), dim=-1), F.normalize(z_t.float(), dim=-1)
        return warmup_mixed_loss(q, k_all[lo:hi] if hi else k_all, queue, m.tau_s, m.tau_t, m.infonce_tau,
                                 relation_weight=w), k_all

    fns: List[Callable] = []  # [relation, mixed], compiled or not, chosen on the first call's device
    w_dev: List[torch.Tensor] = []  # the warm-up weight as a device tensor, made on first use

    def loss_fn(z_s, z_t, queue, w_host: float):
        if not fns:
            compile_ = m.compile_loss and toolchain_problem_here(queue.device.type) is None
            fns.extend(torch.compile(f) if compile_ else f for f in (relation, mixed))
        relation_fn, mixed_fn = fns
        if w_host >= 1.0:
            return relation_fn(z_s, z_t, queue)
        if not w_dev:
            w_dev.append(torch.zeros((), device=queue.device))
        w_dev[0].fill_(w_host)
        return mixed_fn(z_s, z_t, queue, w_dev[0])

    return loss_fn


@dataclass
class State:
    """Everything the loop mutates; `state_dict` is what a checkpoint holds."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    queue: Queue
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: Any
    step: int = 0  # steps completed
    skipped_steps: int = 0  # steps whose loss was non-finite on some rank (no update at all)

    def state_dict(self, cfg: Config, env: Env) -> Optional[dict]:
        """Collective (every rank calls it): rank 0 gets the full dict, the others None."""
        per_rank = dist.gather_objects({"rng": _rng_state(env.device), "loader": self.loader.state_dict(),
                                        "bad_files": list(getattr(self.loader, "bad_files", [])),
                                        "fingerprint": self.fingerprint()}, env)
        if not env.is_main:
            return None
        if len({r["fingerprint"] for r in per_rank}) > 1:  # DDP + the global queue should prevent this
            _info(env, "warning: ranks hold different student/teacher/queue states: "
                  + ", ".join(f"rank {i}: {r['fingerprint'][:12]}" for i, r in enumerate(per_rank)))
        return {
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "queue": self.queue.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "skipped_steps": self.skipped_steps,
            "ranks": per_rank, "world_size": env.world_size,
            "bad_files": sorted({f for r in per_rank for f in r["bad_files"]}),
            # the identity's root is for messages only (the files' sha256 decides): redacted as the
            # config is; the bad files and each rank's loader state keep their paths as they are,
            # since a resume must find those files again
            "data": redact_obj(self.loader.data_identity()) if hasattr(self.loader, "data_identity") else None,
            "config": redact_obj(to_dict(cfg)), "config_hash": config_hash(cfg),
        }

    def fingerprint(self) -> str:
        """sha256 of student and teacher parameters and the queue (+ pointer): equal on every rank
        when in sync. BN running statistics are per rank (DDP does not sync buffers in the forward)."""
        h = hashlib.sha256()
        for module in (self.student, self.teacher):
            for t in module.parameters():
                h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        h.update(self.queue.buffer.cpu().numpy().tobytes())
        h.update(str(int(self.queue.ptr)).encode())
        return h.hexdigest()

    def load_state_dict(self, sd: dict, env: Env, reshard: bool = False) -> None:
        """Everything from `sd`. reshard=True (a checkpoint of another number of ranks, allowed by
        --allow-config-change): weights, queue, optimizer, scaler and step carry over, while each
        rank's data position and RNG cannot be mapped onto the new ranks: the data starts a fresh
        order at the start of the current epoch (epoch = step // steps_per_epoch; the global batch
        and so the schedule are unchanged) and the RNGs are seeded from (seed, step, rank)."""
        self.student.load_state_dict(sd["student"])
        self.teacher.load_state_dict(sd["teacher"])
        self.queue.load_state_dict(sd["queue"])
        self._load_optimizer(sd["optimizer"])
        if sd["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(sd["scaler"])  # (a disabled scaler ignores what it is given)
        else:  # an fp32/bf16 run (no loss scaling: its scaler saved {}) resumed with fp16: torch refuses {}
            _info(env, f"the checkpoint has no loss scale (train.precision was not fp16): fp16 loss scaling "
                       f"starts afresh at {self.scaler.get_scale():g}")
        self.step, self.skipped_steps = int(sd["step"]), int(sd["skipped_steps"])
        if reshard:
            self.loader.load_state_dict({"epoch": self.step // self.loader.steps_per_epoch, "step_in_epoch": 0})
            seed = (int(sd["config"]["train"]["seed"]) * 1_000_003 + self.step) * 1024 + env.rank
            random.seed(seed)
            torch.manual_seed(seed)
            return
        mine = sd["ranks"][env.rank]
        self.loader.load_state_dict(mine["loader"])
        _set_rng_state(mine["rng"], env.device)

    def _load_optimizer(self, saved: dict) -> None:
        """The checkpoint's optimizer state (momentum buffers, Adam moments, step counts) with this
        run's hyper-parameters: torch's load_state_dict also restores every param group's settings,
        so a resume with a changed optim.weight_decay, momentum or fused (--allow-config-change)
        kept the old values without a word while the log named the change, and fused false -> true
        crashed at the first step (the guard hands a fused optimizer found_inf, the restored groups
        were not fused; found in review). lr is the schedule's, set every step."""
        current = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        sizes = [len(g["params"]) for g in self.optimizer.param_groups]
        if sizes != [len(g["params"]) for g in saved["param_groups"]]:
            raise ConfigMismatch(
                f"the optimizer's parameter groups changed (sizes {[len(g['params']) for g in saved['param_groups']]} "
                f"-> {sizes}: optim.weight_decay_filter or the model): its state cannot be carried over; use a new "
                "run.name, or the checkpoint's settings")
        self.optimizer.load_state_dict(saved)
        for group, mine in zip(self.optimizer.param_groups, current):
            group.update(mine)


def _rng_state(device: torch.device) -> dict:
    """This rank's RNG states as bytes/ints (no tensors): immune to torch.load's map_location, and
    only this rank's own CUDA generator (a resume may see fewer GPUs than the run that saved it)."""
    st = {"torch": _bytes(torch.get_rng_state()), "python": list(random.getstate()[1]),
          "python_pos": random.getstate()[2]}
    if device.type == "cuda":
        st["cuda"] = _bytes(torch.cuda.get_rng_state(device))
    return st


def _bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _byte_tensor(x: Any) -> torch.Tensor:
    """A CPU uint8 tensor, as torch.set_rng_state / torch.cuda.set_rng_state require: from bytes, or
    from a tensor on any device (checkpoints written before RNG states were stored as bytes)."""
    if isinstance(x, (bytes, bytearray)):
        return torch.frombuffer(bytearray(x), dtype=torch.uint8)
    return x.detach().to("cpu", torch.uint8)


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(_byte_tensor(st["torch"]))
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    cuda = st.get("cuda")
    if cuda is not None and device.type == "cuda":
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state
            cuda = cuda[device.index or 0]
        torch.cuda.set_rng_state(_byte_tensor(cuda), device)


def _config_diff(a: dict, b: dict, prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _keys_added_at_default(stored: dict, now: dict, defaults: Optional[dict] = None, prefix: str = "") -> List[str]:
    """Dotted keys that a checkpoint's stored config lacks (added to the schema since it was written)
    and that hold the schema default now: resuming such a run is the same experiment, so a newer
    fast_ressl can resume an older run's checkpoints without --allow-config-change. `defaults`: the
    schema's defaults at the same level as `stored` and `now` (the whole config's when None)."""
    defaults = to_dict(Config()) if defaults is None else defaults
    out = []
    for key, value in now.items():
        if key not in stored:
            if key in defaults and defaults[key] == value:
                out.append(prefix + key)
        elif isinstance(value, dict) and isinstance(stored[key], dict):
            sub = defaults.get(key)
            out += _keys_added_at_default(stored[key], value, sub if isinstance(sub, dict) else {}, f"{prefix}{key}.")
    return out


def _data_change(sd: dict, loader: Any) -> str:
    """'' when the loader draws from the same files as the checkpoint's run, else what changed (count
    and the class folders whose count changed). A file deleted after the scan makes the next start
    rescan and drop it: without this check the run would resume on a different dataset (different
    file order, steps per epoch and LR schedule) without a word."""
    old = sd.get("data")
    new = loader.data_identity() if hasattr(loader, "data_identity") else None
    if not old or not new or old["sha256"] == new["sha256"]:
        return ""
    classes = sorted(set(old["per_class"]) | set(new["per_class"]))
    moved = [f"{os.path.join(new['root'] or '', c)} ({old['per_class'].get(c, 0)} -> {new['per_class'].get(c, 0)} files)"
             for c in classes if old["per_class"].get(c, 0) != new["per_class"].get(c, 0)]
    what = f"{old['num_files']} -> {new['num_files']} good files"
    return what + (f"; class folders: {', '.join(moved[:10])}" + (" ..." if len(moved) > 10 else "")
                   if moved else "; same count per class folder, different files")


def maybe_resume(state: State, cfg: Config, env: Env, ckpts: CheckpointDir,
                 allow_config_change: bool) -> Optional[Path]:
    """Restore from the newest valid checkpoint, if any (unusable newer ones are reported and
    skipped). A different config (run-control keys aside) is refused unless allowed explicitly, so a
    resumed run is never silently a different experiment."""
    # On the CPU: load_state_dict copies each tensor to where the module/optimizer/queue lives, and
    # nothing that must stay on the host (RNG states, loader state) lands on a GPU.
    sd, path = agree_on_checkpoint(ckpts, *ckpts.load_newest_valid(map_location="cpu"), env)
    if env.is_main:
        moved = ckpts.set_aside_unusable(None if sd is None else int(sd["step"]))
        if moved:
            _info(env, f"set aside {len(moved)} unusable checkpoint(s), out of the rotation (delete them once "
                  f"inspected): {', '.join(p.name for p in moved)}")
    if sd is None:
        return None
    reshard = sd["world_size"] != env.world_size
    changed = _data_change(sd, state.loader)
    if changed:
        if not allow_config_change:
            raise ConfigMismatch(f"the data changed since {path} was written: {changed}; restore the data to "
                                 "resume exactly, or pass --allow-config-change to continue on the data as it is "
                                 "now (fresh data order from the start of the current epoch)")
        _info(env, f"the data changed since {path}: {changed}; continuing on it (--allow-config-change) with a "
              "fresh data order from the start of the current epoch")
        reshard = True
    if reshard and not allow_config_change:
        raise ConfigMismatch(f"{path} was written by {sd['world_size']} rank(s), this run has {env.world_size}: "
                             f"relaunch with {sd['world_size']} rank(s) to resume exactly, or pass "
                             "--allow-config-change to continue from its weights, queue, optimizer and step "
                             "with a fresh data order from the start of the current epoch")
    if sd["config_hash"] != config_hash(cfg):
        added = _keys_added_at_default(sd["config"], to_dict(cfg))
        diff = [d for d in _config_diff(sd["config"], redact_obj(to_dict(cfg)))
                if not d.startswith(RUN_CONTROL_KEYS) and d.split(":", 1)[0] not in added]
        if not diff:  # only keys this version added, at their defaults: the same experiment
            _info(env, f"config keys added since {path} was written, at their defaults: {', '.join(added)}")
        elif not allow_config_change:
            raise ConfigMismatch(f"{path} was written with a different config:\n  " + "\n  ".join(diff)
                                 + "\nuse a new run.name, or pass --allow-config-change to resume anyway")
        _info(env, "resuming with a changed config (--allow-config-change):\n  " + "\n  ".join(diff))
    if reshard:
        _info(env, f"resuming a {sd['world_size']}-rank checkpoint on {env.world_size} rank(s) "
              "(--allow-config-change): weights, queue, optimizer and step carried over; fresh data order "
              "from the start of the current epoch")
    state.load_state_dict(sd, env, reshard=reshard)
    return path


def agree_on_checkpoint(ckpts: CheckpointDir, sd: Optional[dict], path: Optional[Path],
                        env: Env) -> Tuple[Optional[dict], Optional[Path]]:
    """Every rank resumes from the checkpoint rank 0 found (`sd`, `path`: what this rank found).

    Each rank looks for the newest valid checkpoint on its own, and on a shared filesystem they can
    see different ones: a node whose NFS client still resolves last.pt to the file before (attribute
    caching, up to a minute) when torchrun restarts right after a checkpoint, a read error on one
    rank. Ranks on different steps run different schedules and misalign their collectives (found in
    review). Here the steps are compared; a rank that differs loads rank 0's step by its numbered
    file, and if any rank cannot, every rank raises, naming what each found."""
    if not env.distributed:
        return sd, path
    mine = None if sd is None else int(sd["step"])
    found = dist.gather_objects(mine, env)
    want = found[0]
    if all(f == want for f in found):
        return sd, path
    err = ""
    if want is None:
        err = "rank 0 found no checkpoint"
    elif mine != want:
        path = ckpts.root / f"step_{want:08d}.pt"
        try:
            sd = safe_load(path, map_location="cpu")
            check_complete(sd, path)
        except CheckpointError as e:
            err = f"rank {env.rank} cannot load rank 0's {path.name}: {e}"
    errs = [e for e in dist.gather_objects(err, env) if e]
    steps = ", ".join(f"rank {r}: {'none' if f is None else f'step {f}'}" for r, f in enumerate(found))
    if errs:
        raise CheckpointError(f"the ranks found different newest checkpoints in {ckpts.root} ({steps}) and cannot "
                              f"all resume from rank 0's: {'; '.join(errs)}. Is the run directory on a "
                              "filesystem every node sees, and in sync?")
    _info(env, f"the ranks found different newest checkpoints ({steps}); all resume from rank 0's, step {want}")
    return sd, path


def _info(env: Env, msg: str) -> None:
    if env.is_main:
        log.info(redact_text(msg))


class _SignalFlag:
    """A stop signal (dist.STOP_SIGNALS) sets a flag; the loop stops at the next step boundary on
    every rank. SIGHUP stays ignored where the launcher ignores it: that is what nohup is for."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict = {}

    def __enter__(self) -> "_SignalFlag":
        for sig in dist.STOP_SIGNALS:
            if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(cfg: Config, allow_config_change: bool = False, live: Optional[bool] = None) -> dict:
    """Run (or resume) pretraining; returns the summary written to summary.json.

    Raises Preempted after writing a checkpoint when a stop signal (dist.STOP_SIGNALS) arrived."""
    auto = cfg.train.precision == "auto"
    env = build_env(cfg)  # resolves train.precision=auto
    try:
        with _SignalFlag() as stop_flag:
            return _train(cfg, env, allow_config_change, live, stop_flag,
                          f" (auto: {env.device.type.upper()})" if auto else "")
    finally:
        dist.shutdown()


def _train(cfg: Config, env: Env, allow_config_change: bool, live: Optional[bool],
           stop_flag: _SignalFlag, precision_note: str = "") -> dict:
    run_dir = run_dir_of(cfg)
    ckpts = CheckpointDir(run_dir / "checkpoints", cfg.train.keep_checkpoints, warn=lambda m: _info(env, m))
    lock = _lock_run_dir(run_dir, env, ckpts)
    try:
        return _train_locked(cfg, env, allow_config_change, live, stop_flag, precision_note, run_dir, ckpts)
    finally:
        if lock is not None:
            lock.release()


def _lock_run_dir(run_dir: Path, env: Env, ckpts: CheckpointDir) -> Optional[RunLock]:
    """Rank 0 takes the run directory's lock (one writer per run dir) and removes the temporary
    checkpoint files a killed writer left; every rank fails when the lock is held elsewhere."""
    lock, busy = None, ""
    if env.is_main:
        try:
            lock = RunLock(run_dir)
        except RunDirBusy as e:
            busy = str(e)
    busy = dist.gather_objects(busy, env)[0]
    if busy:
        raise RunDirBusy(busy)
    if env.is_main:
        ckpts.root.mkdir(parents=True, exist_ok=True)
        removed = ckpts.remove_orphans()
        if removed:
            _info(env, f"removed {len(removed)} temporary checkpoint file(s) left by a killed run: "
                  + ", ".join(p.name for p in removed))
    return lock


def _train_locked(cfg: Config, env: Env, allow_config_change: bool, live: Optional[bool],
                  stop_flag: _SignalFlag, precision_note: str, run_dir: Path, ckpts: CheckpointDir) -> dict:
    student, teacher = build_student_teacher(cfg.model, env.device, cfg.train.channels_last)
    bn_policy = teacher_bn_policy(cfg, env)
    if bn_policy == "sync":
        teacher = convert_sync_bn(teacher)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    queue = Queue(cfg.method.queue_size, cfg.model.proj_dim, env.device, generator=gen)
    loader = build_loader(cfg, env.rank, env.world_size, env.device)
    dist.wait_for_all(env, PREPARE_TIMEOUT_S)  # a node that scanned its own denylist may come an hour late
    steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    base_lr = cfg.optim.lr * cfg.train.batch_size / 256  # lr is given per 256 images
    optimizer, optim_desc = build_optimizer(student, cfg.optim, base_lr, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    state = State(student, teacher, queue, optimizer, scaler, loader)
    resumed = maybe_resume(state, cfg, env, ckpts, allow_config_change)
    if env.is_main:  # only once the config is accepted: a refused resume leaves the run's own
        (run_dir / "config.yaml").write_text(redact_text(to_yaml(cfg)))
    end_step = min(total_steps, cfg.train.stop_at_step or total_steps)
    if hasattr(loader, "end_at"):  # DALI: no pipeline built ahead for an epoch the run never reaches
        loader.end_at(end_step)
    group = f" ({torch.distributed.get_backend()}, DDP)" if env.distributed else ""
    _info(env, f"fast-ressl: {cfg.model.backbone} on {env.device} x {env.world_size} rank(s){group}, "
          f"{cfg.train.precision}{precision_note}, global batch {cfg.train.batch_size} "
          f"({cfg.train.batch_size // env.world_size} per rank) x {len(cfg.data.strong)} strong view(s), "
          f"lr {base_lr:.4g} (= {cfg.optim.lr} per 256 x {cfg.train.batch_size}/256), {optim_desc}, "
          f"teacher BN {bn_policy}; {steps_per_epoch} steps/epoch, {total_steps} steps; run dir {run_dir}"
          + (f"; resumed from {resumed} at step {state.step}" if resumed else ""))
    summary_path = run_dir / "summary.json"
    # a run stopped by a signal on its last step has all its steps, but not its last epoch's kNN
    # check nor a completed summary (it stayed "preempted" for good; found in review): both below
    stopped_at_the_end = (state.step >= total_steps and summary_path.exists()
                          and json.loads(summary_path.read_text()).get("status") == "preempted")
    if state.step >= end_step and not stopped_at_the_end:
        _info(env, f"nothing to do: the run is at step {state.step} (stops at {end_step})")
        if summary_path.exists():  # keep the finished run's summary instead of overwriting it
            return json.loads(summary_path.read_text())
        return _finish(cfg, state, run_dir, total_steps, None, env)
    meter = _Meter(cfg, env, run_dir, total_steps, steps_per_epoch, state.step, live)
    meter.skipped_before = state.skipped_steps  # a resumed run keeps counting from the checkpoint's
    loop = None
    try:
        loss_fn = build_loss_fn(cfg, env.rank, cfg.train.batch_size // env.world_size)
        loop = Loop(cfg, env, state, loss_fn, bn_policy, steps_per_epoch, total_steps, base_lr, ckpts, meter,
                    stop_flag)
        if resumed and state.step and state.step % steps_per_epoch == 0:
            # a checkpoint at an epoch boundary is written before that epoch's kNN check: a stop
            # signal (or a kill) there skipped it, and the resumed run starts after it
            knn_monitor(cfg, env, state, meter, state.step // steps_per_epoch, total_steps // steps_per_epoch)
        loop.run(end_step)
    finally:
        meter.close()
        if loop is not None:
            loop.close()
    if stop_flag.signum:
        _finish(cfg, state, run_dir, total_steps, meter, env, status="preempted")
        raise Preempted(stop_flag.signum)
    return _finish(cfg, state, run_dir, total_steps, meter, env)


class Loop:
    """The training loop: set-up once here, then `run(end_step)`: schedule -> student(x_strong) ->
    teacher(x_weak) -> loss -> backward -> step -> EMA -> enqueue; the host syncs only once per log
    interval. Around the networks a step issues a few dozen ops (measured by `fast-ressl bench`):
    the non-finite guard, BN-statistics restore, EMA and queue are multi-tensor ops on device tensors.

    `fast-ressl bench` builds one Loop outside its timer and times `run` over a few steps at a time,
    with ckpts=None (no checkpoint I/O in timed steps) and, for the reference preset, its Python-loop
    EMA as ema_fn."""

    def __init__(self, cfg: Config, env: Env, s: State, loss_fn: Callable, bn_policy: str,
                 steps_per_epoch: int, total_steps: int, base_lr: float, ckpts: Optional[CheckpointDir],
                 meter: "_Meter", stop_flag: _SignalFlag, ema_fn: Callable = ema_update_):
        self.cfg, self.env, self.s, self.loss_fn, self.bn_policy = cfg, env, s, loss_fn, bn_policy
        self.steps_per_epoch, self.total_steps, self.base_lr = steps_per_epoch, total_steps, base_lr
        self.ckpts, self.meter, self.stop_flag, self.ema_fn = ckpts, meter, stop_flag, ema_fn
        t_cfg = cfg.train
        self.amp = torch.autocast(env.device.type, dtype=_AMP[t_cfg.precision], enabled=t_cfg.precision != "fp32")
        self.student = _wrap_student(s.student, cfg, env)
        self.teacher = compile_network(s.teacher, cfg.model.compile_mode) if cfg.model.compile else s.teacher
        # CUDA graphs (model.compile_mode=reduce-overhead/max-autotune): each step is marked, and
        # graphs inductor ran without one are reported after the first step (fast_ressl/compiling.py)
        self.cudagraphs = wants_cudagraphs(cfg.model.compile, cfg.model.compile_mode, env.device)
        self.cudagraph_skips = CudagraphSkips().start() if self.cudagraphs else None
        self.cudagraphs_warned = (0, 0)  # (graphs, reasons) without CUDA graphs already warned about
        if cfg.model.compile_mode in CUDAGRAPH_MODES and not self.cudagraphs:
            _info(env, f"model.compile_mode={cfg.model.compile_mode}: CUDA graphs need CUDA; on {env.device} "
                  "the networks are compiled without them")
        self.t_params, self.s_params = ema_pairs(s.student, s.teacher)
        self.prep = functools.partial(_prep, device=env.device, fp32=t_cfg.precision == "fp32",
                                      cl=t_cfg.channels_last)
        self.warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
        self.nce_steps = round(cfg.method.infonce_warmup_epochs * steps_per_epoch)
        self.guard = NonFiniteGuard(s.optimizer, s.scaler, env, [s.student, s.teacher])
        self.data = iter(s.loader)

    def run(self, end_step: int) -> None:
        """Steps s.step+1 .. end_step (returns early, with a checkpoint, on a stop signal)."""
        cfg, env, s, meter, guard, t_cfg = self.cfg, self.env, self.s, self.meter, self.guard, self.cfg.train
        first = s.step
        for step in range(s.step, end_step):
            if self.cudagraphs:  # host-only: inductor may now reuse the last step's graph outputs
                torch.compiler.cudagraph_mark_step_begin()
            lr = lr_at(step, self.base_lr, self.warmup_steps, self.total_steps, cfg.optim.min_lr)
            m = momentum_at(step, cfg.method.momentum, self.total_steps, cfg.method.momentum_schedule,
                            cfg.method.momentum_end)
            w = relation_weight_at(step, self.nce_steps, cfg.method.infonce_handover)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            batch = meter.timed_next(self.data)
            x_weak, x_strong = self.prep(batch.x_weak), [self.prep(x) for x in batch.x_strong]
            guard.snapshot_buffers()
            with self.amp:
                z_s = self.student(x_strong)  # (V, N, D)
                z_t = dist.teacher_keys(self.teacher, x_weak, env, self.bn_policy, step, t_cfg.seed)  # (world*N, D)
            loss, k_all = self.loss_fn(z_s, z_t, s.queue.buffer, w)  # k_all: L2-normalised, rank order
            logs = (step + 1) % t_cfg.log_every == 0 or step + 1 == end_step
            if logs:  # collapse indicators against the queue the loss saw (before the push)
                meter.collapse = collapse_indicators(k_all, s.queue.buffer, cfg.method.tau_t)
            loss = inject_fault(loss, step + 1, env.rank)
            ok = guard.finite(loss)  # device bool, equal on all ranks
            s.optimizer.zero_grad(set_to_none=True)
            s.scaler.scale(loss).backward()
            guard.step(ok)  # no optimizer step, BN-statistics, EMA or enqueue change when any loss is non-finite
            self.ema_fn(self.t_params, self.s_params, m, ok)
            s.queue.push(k_all, ok)  # after the loss: it saw the queue from before this batch
            s.step = step + 1
            meter.add(loss, ok, guard.local_finite, x_weak.shape[0])
            if logs:
                meter.midrun_bad = getattr(s.loader, "midrun_bad", {})  # files that failed mid-run
                s.skipped_steps = meter.log(s.step, lr, m)  # the one host sync of the interval
            if self.cudagraph_skips is not None and (logs or step == first):
                self._check_cudagraphs()
            stopping = dist.any_flag(bool(self.stop_flag.signum), env)  # gloo on the host: no GPU sync
            if self.ckpts is not None and (stopping or s.step % t_cfg.ckpt_every == 0 or s.step == end_step):
                save_checkpoint(s, cfg, env, self.ckpts, meter)
            if stopping:
                self.stop_flag.signum = self.stop_flag.signum or signal.SIGTERM  # a peer rank got the signal
                _info(env, f"signal {self.stop_flag.signum}: stopped at step {s.step}, checkpoint written")
                return
            if s.step % self.steps_per_epoch == 0:  # epoch boundary: online kNN monitor (evaluate.py)
                knn_monitor(cfg, env, s, meter, s.step // self.steps_per_epoch,
                            self.total_steps // self.steps_per_epoch)

    def _check_cudagraphs(self) -> None:
        """After the first step (every graph is compiled by then: student forward and backward,
        teacher forward) and at each log step (inductor also gives up on a graph that it had to
        re-record too often): a warning, with inductor's reasons, for graphs newly run without a
        CUDA graph. Host-only: a Python counter."""
        skips, (count, said) = self.cudagraph_skips, self.cudagraphs_warned
        if skips.count > count:
            new = skips.reasons[said:]
            _info(self.env, f"warning: model.compile_mode={self.cfg.model.compile_mode}: {skips.count - count} "
                  f"{'more ' if count else ''}compiled graph(s) run without CUDA graphs (inductor: "
                  f"{'; '.join(new) or 'no new reason given'}); they launch every kernel as "
                  "model.compile_mode=default does")
            self.cudagraphs_warned = (skips.count, len(skips.reasons))

    def close(self) -> None:
        """Detach what the loop attached (the CUDA-graph skip collector); its figures stay readable."""
        if self.cudagraph_skips is not None:
            self.cudagraph_skips.stop()


def _no_forward_buffer_sync(ddp_class: type) -> Dict[str, bool]:
    """DDP's keyword for "do not broadcast rank 0's buffers (BN statistics) before every forward":
    each rank keeps its own, as in the original ReSSL. Newer torch names it forward_sync_buffers and
    deprecates broadcast_buffers (torch 2.14 prints a FutureWarning on every rank of every run); older
    torch (the GPU image's 2.11) has only broadcast_buffers. The new keyword still broadcasts rank
    0's buffers once, in place, at DDP's construction; they are equal on every rank then (BN's fixed
    initial values, or every rank loaded rank 0's checkpoint), so that broadcast changes nothing."""
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _wrap_student(student: torch.nn.Module, cfg: Config, env: Env) -> torch.nn.Module:
    """DDP wraps the student only (the teacher stays a plain frozen module); then torch.compile."""
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        student = DDP(student, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                      **_no_forward_buffer_sync(DDP))
    return compile_network(student, cfg.model.compile_mode) if cfg.model.compile else student


def save_checkpoint(s: State, cfg: Config, env: Env, ckpts: CheckpointDir, meter: "_Meter") -> None:
    s.skipped_steps = meter.sync_skipped()
    sd = s.state_dict(cfg, env)  # collective
    if env.is_main:
        ckpts.save(sd, s.step)
    if env.distributed:  # no rank leaves (or gets killed by torchrun) before the file is complete
        torch.distributed.barrier(group=env.ctrl_group)


class NonFiniteGuard:
    """A NaN/inf loss on any rank -> no change on any rank, decided on the device.

    torch's fused optimizers take a `found_inf` tensor and skip the update inside the kernel (the
    GradScaler's mechanism), so no host sync is needed; with fp16 the GradScaler itself skips (the
    non-finite loss makes every rank's all-reduced gradients non-finite). Optimizers without that
    hook (timm LARS/LAMB, foreach SGD/AdamW) cost one host sync per step here.

    BN running statistics change in the forward pass; they live in one flat tensor per dtype
    (model.flatten_buffers), snapshotted before the forward and restored by one `where` per dtype.

    The optimizer state is materialised before the first step (optim.materialize_state): torch's
    fused SGD creates its momentum buffers inside its first step with `empty_like` and returns
    early when found_inf is set, so a skipped first step would leave garbage buffers that the next
    clean step writes into the weights.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, env: Env,
                 modules: List[torch.nn.Module]):
        self.optimizer, self.scaler, self.env = optimizer, scaler, env
        self.device_skip = scaler.is_enabled() or bool(optimizer.defaults.get("fused"))
        materialize_state(optimizer)
        self.flats = flatten_buffers(modules)  # already flat from build_student_teacher: no copy
        self.backup = [f.clone() for f in self.flats]
        self.local_finite = torch.ones((), dtype=torch.bool, device=env.device)  # this rank's own loss
        self.found_inf = torch.zeros((), device=env.device)  # float32, what fused kernels read

    def snapshot_buffers(self) -> None:
        for backup, flat in zip(self.backup, self.flats):
            backup.copy_(flat)

    def finite(self, loss: torch.Tensor) -> torch.Tensor:
        """0-dim bool device tensor: every rank's loss is finite (all-reduced, no host sync)."""
        self.local_finite = torch.isfinite(loss.detach())
        torch.logical_not(self.local_finite, out=self.found_inf)
        if not self.env.distributed:
            return self.local_finite
        dist.all_reduce_(self.found_inf, self.env, "max")
        return self.found_inf == 0

    def step(self, ok: torch.Tensor) -> None:
        for flat, backup in zip(self.flats, self.backup):  # where(), not lerp: NaN * 0 is NaN
            torch.where(ok, flat, backup, out=flat)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.device_skip:
            self.optimizer.found_inf = self.found_inf  # read by torch's fused kernels
            self.optimizer.step()
        elif bool(ok):  # host sync: this optimizer cannot skip on the device
            self.optimizer.step()


def inject_fault(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """Fault injection for the reliability tests: FAST_RESSL_FAULT_NAN="STEP:RANK[,STEP:RANK...]"
    makes the loss NaN at those (1-based) steps on those ranks. Unset in normal runs."""
    spec = os.environ.get("FAST_RESSL_FAULT_NAN")
    if spec and f"{step}:{rank}" in spec.split(","):
        return loss * float("nan")
    return loss


def _prep(x: torch.Tensor, device: torch.device, fp32: bool, cl: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if fp32 and x.dtype != torch.float32:
        x = x.float()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


class _Meter:
    """Loss, skipped steps and data wait accumulated on the device/host; one sync per log interval.

    Per step `add` issues 6 small device ops; the skipped count is derived on the host at log time
    (steps in the interval minus finite ones)."""

    def __init__(self, cfg: Config, env: Env, run_dir: Path, total_steps: int, steps_per_epoch: int,
                 start_step: int, live: Optional[bool]):
        dev = env.device
        self.env, self.steps_per_epoch, self.max_streak = env, steps_per_epoch, cfg.train.max_nonfinite_steps
        self.loss_sum = torch.zeros((), device=dev)
        self.finite_count = torch.zeros((), device=dev, dtype=torch.long)  # all ranks finite, this interval
        self.local_finite_count = torch.zeros((), device=dev, dtype=torch.long)  # this rank's own loss
        self.streak = torch.zeros((), device=dev, dtype=torch.long)  # non-finite steps in a row
        self.worst_streak = torch.zeros((), device=dev, dtype=torch.long)
        self.skipped_before = 0  # skipped steps before this interval (checkpoint + earlier intervals)
        self.steps_local = 0  # steps of this invocation (host count, for this rank's own NaN count)
        self.count = 0  # steps in this interval
        self.wait_s = self.total_wait_s = 0.0
        self.t_interval = self.t_start = time.perf_counter()
        self.images = 0
        self.records: List[dict] = []
        self.collapse: Optional[torch.Tensor] = None  # (2,) from ressl.collapse_indicators, log steps
        self.midrun_bad: dict = {}  # this rank's loader's files that failed mid-run {path: reason}
        self._bad_logged: set = set()
        # the queue holds only keys of this run (none of its random initial rows) from this step on;
        # before it, a near-uniform relation is the expected start, not a collapse
        self.queue_filled_step = -(-cfg.method.queue_size // cfg.train.batch_size)
        self.collapsed_since: Optional[int] = None
        self.metrics = log.MetricsLog(run_dir / "metrics.jsonl") if env.is_main else None
        self.tb = log.tensorboard_writer(run_dir / "tensorboard") if env.is_main else None
        self.display = log.ProgressDisplay(total_steps, steps_per_epoch, start_step, env.is_main, live)

    def timed_next(self, data) -> Any:
        t0 = time.perf_counter()
        batch = next(data)
        self.wait_s += time.perf_counter() - t0
        return batch

    def add(self, loss: torch.Tensor, ok: torch.Tensor, local_finite: torch.Tensor, images: int) -> None:
        """loss: 0-dim; ok: 0-dim bool, every rank finite; local_finite: 0-dim bool, this rank's;
        images: this rank's batch size."""
        self.loss_sum += torch.where(ok, loss.detach(), 0.0)
        self.finite_count += ok
        self.local_finite_count += local_finite
        self.streak.add_(1).mul_(~ok)  # reset to 0 by a finite step
        torch.maximum(self.worst_streak, self.streak, out=self.worst_streak)
        self.count += 1
        self.steps_local += 1
        self.images += images * self.env.world_size

    def sync_skipped(self) -> int:
        """Skipped steps of the whole run so far (host sync)."""
        return self.skipped_before + self.count - int(self.finite_count.item())

    def log(self, step: int, lr: float, m: float) -> int:
        finite = int(self.finite_count.item())  # host sync
        mean = self.loss_sum.item() / finite if finite else float("nan")
        skipped = self.skipped_before = self.skipped_before + self.count - finite
        now = time.perf_counter()
        dt = now - self.t_interval
        record = {"step": step, "epoch": (step - 1) // self.steps_per_epoch, "loss": mean, "lr": lr,
                  "momentum": m, "img_per_s": self.images / dt if dt > 0 else 0.0,
                  "data_wait_frac": self.wait_s / dt if dt > 0 else 0.0, "skipped_steps": skipped,
                  "time": time.time()}
        if self.midrun_bad:
            record["midrun_bad_files"] = len(self.midrun_bad)
            for path in sorted(set(self.midrun_bad) - self._bad_logged):  # one row per file, with its path
                self._bad_logged.add(path)
                if self.metrics is not None:
                    self.metrics.write({"step": step, "bad_file": path, "reason": self.midrun_bad[path],
                                        "rank": self.env.rank, "time": time.time()})
        if self.collapse is not None:
            entropy, mean_cos = self.collapse.tolist()
            record.update(target_entropy_frac=entropy, queue_mean_cos=mean_cos)
            self._warn_collapse(step, entropy, mean_cos)
        self.records.append(record)
        self.total_wait_s += self.wait_s
        self.t_interval, self.wait_s, self.images, self.count = now, 0.0, 0, 0
        self.loss_sum.zero_()
        self.finite_count.zero_()
        if self.metrics is not None:
            self.metrics.write(record)
        if self.tb is not None:
            for key in ("loss", "lr", "momentum", "img_per_s", "data_wait_frac", "skipped_steps"):
                self.tb.add_scalar(f"train/{key}", record[key], step)
        self.display.update(record)
        if int(self.worst_streak.item()) >= self.max_streak:
            local_bad = self.steps_local - int(self.local_finite_count.item())
            ranks = [r for r, bad in enumerate(dist.gather_objects(local_bad, self.env)) if bad]
            raise NonFiniteAbort(f"{self.max_streak} non-finite losses in a row by step {step} "
                                 f"(non-finite on rank(s) {ranks}); no update was applied for those "
                                 "steps; lower the LR or check the data, then resume from the last checkpoint")
        return skipped

    # Thresholds (fractions): measured on the demo's collapsed runs, the targets' entropy sat at
    # 0.99+ of log K with the queue's mean cosine at 0.94-0.999, while a learning run's targets stay
    # well below uniform (tau_t = 0.04 sharpens any real spread of the keys).
    COLLAPSED_ENTROPY, COLLAPSED_COS = 0.95, 0.9

    def _warn_collapse(self, step: int, entropy: float, mean_cos: float) -> None:
        """One warning when the relation enters a collapsed state (and one when it leaves it)."""
        collapsed = step >= self.queue_filled_step and (entropy > self.COLLAPSED_ENTROPY
                                                          or mean_cos > self.COLLAPSED_COS)
        if collapsed and self.collapsed_since is None:
            self.collapsed_since = step
            _info(self.env, f"warning: the relation looks collapsed at step {step}: teacher targets at "
                  f"{entropy:.3f} of the uniform entropy (log K), mean cosine between queue keys "
                  f"{mean_cos:.3f}; the loss then stays near log K and the backbone stops learning. "
                  "Check tau_t, the teacher momentum, the LR and the augmentations (README: collapse)")
        elif not collapsed and self.collapsed_since is not None:
            _info(self.env, f"the relation recovered at step {step} (collapsed since step {self.collapsed_since})")
            self.collapsed_since = None

    def close(self) -> None:
        self.display.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()


def _finish(cfg: Config, s: State, run_dir: Path, total_steps: int, meter: Optional[_Meter], env: Env,
            status: Optional[str] = None) -> dict:
    records = meter.records if meter else []
    wall = time.perf_counter() - meter.t_start if meter else 0.0
    bad = sorted({f for r in dist.gather_objects(list(getattr(s.loader, "bad_files", [])), env) for f in r})
    summary = {
        "status": status or ("completed" if s.step >= total_steps else "stopped"),
        "step": s.step, "total_steps": total_steps,
        "final_loss": records[-1]["loss"] if records else None,
        "wall_s": round(wall, 3), "world_size": env.world_size,
        "img_per_s": (sum(r["img_per_s"] for r in records) / len(records)) if records else None,
        "data_wait_frac": round(meter.total_wait_s / wall, 4) if meter and wall > 0 else None,
        "skipped_steps": s.skipped_steps, "num_bad_files": len(bad), "bad_files": bad,
        "run_dir": str(run_dir), "backbone": cfg.model.backbone, "config_hash": config_hash(cfg),
    }
    if env.is_main:
        log.write_json(run_dir / "summary.json", redact_obj(summary))
        loss = f"{summary['final_loss']:.4f}" if records else "n/a"
        from .plot import plot_after_run  # matplotlib only if installed; never fails the run

        plot_after_run(run_dir, lambda msg: _info(env, msg))
        _info(env, f"done ({summary['status']}): step {s.step}/{total_steps}, final loss {loss}, "
              f"{wall:.1f} s, {len(bad)} bad file(s), {s.skipped_steps} skipped step(s); "
              f"summary in {run_dir / 'summary.json'}" + _knn_summary(run_dir, s.step))
    return summary


def _knn_summary(run_dir: Path, step: int) -> str:
    """The end-of-run kNN comparison (knn.json of this step, eval.knn_compare_random) as the last
    line's tail, so the run's final words are the figures that say whether it learned."""
    try:
        knn = json.loads((run_dir / "knn.json").read_text())
    except (OSError, ValueError):
        return ""
    if knn.get("step") != step:
        return ""
    names = (("pretrained", "pretrained"), ("random_init", "same backbone random init"),
             ("raw_pixels", "raw pixels"))
    parts = [f"{label} {knn[key]['top1']:.2f}%" for key, label in names if isinstance(knn.get(key), dict)]
    return f"\nkNN top-1 (k={knn.get('k')}, T={knn.get('temperature')}): " + ", ".join(parts) if parts else ""
