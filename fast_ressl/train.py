"""`fast-ressl train`: set-up in build_* helpers, then the one-screen loop in device order."""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from . import log
from .checkpoint import atomic_save, check_complete, safe_load
from .config import Config, config_hash, to_dict, to_yaml
from .data import build_loader
from .model import build_student_teacher, ema_pairs, ema_update_
from .optim import build_optimizer
from .ressl import Queue, ressl_loss, warmup_mixed_loss
from .schedules import lr_at, momentum_at, relation_weight_at

_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConfigMismatch(RuntimeError):
    pass


@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def build_env(cfg: Config) -> Env:
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible")
    device = torch.device(want)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 loss matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cpu" and cfg.train.precision == "bf16" and len({v.size for v in cfg.data.strong}) > 1:
        # Measured with torch 2.14.1: CPU bf16 autocast with student views of several sizes gave
        # run-to-run different losses and occasional NaNs inside oneDNN (gone with oneDNN disabled,
        # which made the step ~25x slower; fp32 is deterministic at about half the bf16 speed).
        log.info("warning: bf16 on CPU with multi-crop views of different sizes is not deterministic "
                 "in oneDNN (occasional NaN); use train.precision=fp32 for such CPU runs")
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    return Env(device=device)


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.dir) if cfg.run.dir else Path("runs") / cfg.run.name


def build_loss_fn(cfg: Config) -> Callable[..., torch.Tensor]:
    """loss_fn(q, k, queue, relation_weight) -> 0-dim loss; compiled unless method.compile_loss=false.

    Without an InfoNCE warm-up this is exactly ressl_loss; with one, the mixed loss is used while the
    relation weight is below 1 (the loop passes the weight as a 0-dim tensor: no recompiles).
    """
    m = cfg.method
    relation = functools.partial(ressl_loss, tau_s=m.tau_s, tau_t=m.tau_t)
    mixed = functools.partial(warmup_mixed_loss, tau_s=m.tau_s, tau_t=m.tau_t, tau_nce=m.infonce_tau)
    if m.compile_loss:
        relation, mixed = torch.compile(relation), torch.compile(mixed)

    def loss_fn(q, k, queue, w: torch.Tensor, w_host: float) -> torch.Tensor:
        return relation(q, k, queue) if w_host >= 1.0 else mixed(q, k, queue, relation_weight=w)

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
    extra: Dict[str, Any] = field(default_factory=dict)

    def state_dict(self, cfg: Config) -> dict:
        return {
            "student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
            "queue": self.queue.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "step": self.step, "loader": self.loader.state_dict(),
            "config": to_dict(cfg), "config_hash": config_hash(cfg), "rng": _rng_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.student.load_state_dict(sd["student"])
        self.teacher.load_state_dict(sd["teacher"])
        self.queue.load_state_dict(sd["queue"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scaler.load_state_dict(sd["scaler"])
        self.loader.load_state_dict(sd["loader"])
        self.step = int(sd["step"])
        _set_rng_state(sd["rng"])


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
          "python_pos": random.getstate()[2]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _config_diff(a: dict, b: dict, prefix: str = "") -> List[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def maybe_resume(state: State, cfg: Config, ckpt: Path, allow_config_change: bool) -> bool:
    """Restore from ckpt if it exists. A different config (run-control keys aside) is refused unless
    allowed explicitly, so a resumed run is never silently a different experiment."""
    if not ckpt.exists():
        return False
    sd = safe_load(ckpt, map_location=state.queue.buffer.device)
    check_complete(sd, ckpt)
    if sd["config_hash"] != config_hash(cfg):
        diff = [d for d in _config_diff(sd["config"], to_dict(cfg))
                if not d.startswith(("train.stop_at_step", "train.log_every", "run.device"))]
        if not allow_config_change:
            raise ConfigMismatch(f"{ckpt} was written with a different config:\n  " + "\n  ".join(diff)
                                 + "\nuse a new run.name, or pass --allow-config-change to resume anyway")
        log.info("resuming with a changed config (--allow-config-change):\n  " + "\n  ".join(diff))
    state.load_state_dict(sd)
    return True


def train(cfg: Config, allow_config_change: bool = False, live: Optional[bool] = None) -> dict:
    """Run (or resume) pretraining; returns the summary written to summary.json."""
    env = build_env(cfg)
    run_dir = run_dir_of(cfg)
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    student, teacher = build_student_teacher(cfg.model, env.device, cfg.train.channels_last)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    queue = Queue(cfg.method.queue_size, cfg.model.proj_dim, env.device, generator=gen)
    loader = build_loader(cfg, env.rank, env.world_size, env.device)
    steps_per_epoch = loader.steps_per_epoch
    total_steps = cfg.train.epochs * steps_per_epoch
    base_lr = cfg.optim.lr * cfg.train.batch_size / 256  # lr is given per 256 images
    optimizer, optim_desc = build_optimizer(student, cfg.optim, base_lr, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.train.precision == "fp16")
    state = State(student, teacher, queue, optimizer, scaler, loader)
    ckpt = run_dir / "checkpoints" / "last.pt"
    resumed = maybe_resume(state, cfg, ckpt, allow_config_change)
    end_step = min(total_steps, cfg.train.stop_at_step or total_steps)
    if env.is_main:
        log.info(f"fast-ressl: {cfg.model.backbone} on {env.device}, {cfg.train.precision}, "
                 f"global batch {cfg.train.batch_size} x {len(cfg.data.strong)} strong view(s), "
                 f"lr {base_lr:.4g} (= {cfg.optim.lr} x {cfg.train.batch_size}/256), {optim_desc}; "
                 f"{steps_per_epoch} steps/epoch, {total_steps} steps; run dir {run_dir}"
                 + (f"; resumed at step {state.step}" if resumed else ""))
    if state.step >= end_step:
        log.info(f"nothing to do: the run is at step {state.step} (stops at {end_step})")
        return _finish(cfg, state, run_dir, end_step, total_steps, [], 0.0, env)
    t0 = time.perf_counter()
    losses = run_loop(cfg, env, state, build_loss_fn(cfg), steps_per_epoch, total_steps, end_step,
                      base_lr, run_dir, ckpt, live)
    return _finish(cfg, state, run_dir, end_step, total_steps, losses, time.perf_counter() - t0, env)


def run_loop(cfg: Config, env: Env, s: State, loss_fn: Callable, steps_per_epoch: int, total_steps: int,
             end_step: int, base_lr: float, run_dir: Path, ckpt: Path, live: Optional[bool]) -> List[float]:
    """The training loop: schedule -> student(x_strong) -> teacher(x_weak) -> loss -> backward ->
    step -> EMA -> enqueue; the host syncs only once per log interval."""
    t_cfg, dev = cfg.train, env.device
    amp = torch.autocast(dev.type, dtype=_AMP[t_cfg.precision], enabled=t_cfg.precision != "fp32")
    student = torch.compile(s.student) if cfg.model.compile else s.student
    teacher = torch.compile(s.teacher) if cfg.model.compile else s.teacher
    t_params, s_params = ema_pairs(s.student, s.teacher)
    prep = functools.partial(_prep, device=dev, fp32=t_cfg.precision == "fp32", cl=t_cfg.channels_last)
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)
    nce_steps = round(cfg.method.infonce_warmup_epochs * steps_per_epoch)
    meter = _Meter(dev, run_dir, env, total_steps, steps_per_epoch, s.step, live)
    data = iter(s.loader)
    for step in range(s.step, end_step):
        lr = lr_at(step, base_lr, warmup_steps, total_steps, cfg.optim.min_lr)
        m = momentum_at(step, cfg.method.momentum, total_steps, cfg.method.momentum_schedule,
                        cfg.method.momentum_end)
        w = relation_weight_at(step, nce_steps, cfg.method.infonce_handover)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        batch = next(data)
        x_weak, x_strong = prep(batch.x_weak), [prep(x) for x in batch.x_strong]
        with amp:
            q = torch.stack([F.normalize(student(x).float(), dim=1) for x in x_strong])  # (V, N, D)
            with torch.no_grad():
                k = F.normalize(teacher(x_weak).float(), dim=1)  # (N, D)
        loss = loss_fn(q, k, s.queue.buffer, meter.weight(w), w)  # queue read before the push
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        ema_update_(t_params, s_params, m)
        s.queue.push(k)
        s.step = step + 1
        meter.add(loss, x_weak.shape[0])
        if s.step % t_cfg.log_every == 0 or s.step == end_step:
            meter.log(s.step, lr, m)  # the one host sync of the interval
        if s.step % t_cfg.ckpt_every == 0 or s.step == end_step:
            atomic_save(s.state_dict(cfg), ckpt)
    meter.close()
    return meter.losses


def _prep(x: torch.Tensor, device: torch.device, fp32: bool, cl: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if fp32 and x.dtype != torch.float32:
        x = x.float()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)


class _Meter:
    """Accumulates the loss on the device; one .item() per log interval."""

    def __init__(self, device: torch.device, run_dir: Path, env: Env, total_steps: int,
                 steps_per_epoch: int, start_step: int, live: Optional[bool]):
        self.device, self.env, self.steps_per_epoch = device, env, steps_per_epoch
        self.loss_sum = torch.zeros((), device=device)
        self.count = 0
        self.losses: List[float] = []  # per-interval means (host copies)
        self.throughput = log.Throughput()
        self._w = torch.ones((), device=device)
        self.metrics = log.MetricsLog(run_dir / "metrics.jsonl") if env.is_main else None
        self.display = log.ProgressDisplay(total_steps, steps_per_epoch, start_step, env.is_main, live)

    def weight(self, w: float) -> torch.Tensor:
        self._w.fill_(w)
        return self._w

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.detach()
        self.count += 1
        self.throughput.add(images * self.env.world_size)

    def log(self, step: int, lr: float, m: float) -> None:
        mean = self.loss_sum.item() / self.count  # host sync
        self.losses.append(mean)
        record = {"step": step, "epoch": (step - 1) // self.steps_per_epoch, "loss": mean, "lr": lr,
                  "momentum": m, "img_per_s": self.throughput.rate(), "time": time.time()}
        self.loss_sum.zero_()
        self.count = 0
        if self.metrics is not None:
            self.metrics.write(record)
        self.display.update(record)

    def close(self) -> None:
        self.display.close()
        if self.metrics is not None:
            self.metrics.close()


def _finish(cfg: Config, s: State, run_dir: Path, end_step: int, total_steps: int,
            losses: List[float], wall_s: float, env: Env) -> dict:
    summary = {
        "status": "completed" if s.step >= total_steps else "stopped",
        "step": s.step, "total_steps": total_steps, "final_loss": losses[-1] if losses else None,
        "wall_s": round(wall_s, 3), "run_dir": str(run_dir), "backbone": cfg.model.backbone,
        "config_hash": config_hash(cfg),
        "bad_files": list(getattr(s.loader, "bad_files", [])),
    }
    if env.is_main:
        log.write_json(run_dir / "summary.json", summary)
        loss = f"{summary['final_loss']:.4f}" if losses else "n/a"
        log.info(f"done: step {s.step}/{total_steps}, final loss {loss}, {wall_s:.1f} s; "
                 f"summary in {run_dir / 'summary.json'}")
    return summary
