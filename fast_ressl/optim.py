"""Optimizer construction: two parameter groups (no weight decay on norm and bias parameters).

`optim.name` picks the update rule, `optim.impl` the implementation:

    name   impl (auto first)   implementation
    sgd    auto|torch          torch.optim.SGD, fused kernel where the device has one (CUDA, CPU)
    adamw  auto|torch          torch.optim.AdamW, fused likewise
    lars   auto|timm           timm.optim.Lars (multi-tensor, no host sync; apex has no LARS)
    lamb   auto|timm|apex      timm.optim.Lamb, or apex.optimizers.FusedLAMB when impl=apex, apex
                               imports and the parameters live on CUDA; otherwise timm, saying why

LARS and LAMB adapt the LR per tensor (trust ratio ||w|| / ||update||). Norm scales/shifts and biases
sit in the group with weight_decay 0, and all three implementations skip the trust ratio for a group
whose weight decay is 0 (timm: always_adapt=False; apex: use_nvlamb=False), so those parameters are
excluded from adaptation and from decay, as in the LARS/BYOL/SimCLR recipes.
None of these implementations syncs with the host inside `step()`.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .config import OptimConfig

# LAMB clips the global gradient norm to this inside the step (timm's and apex's default).
LAMB_MAX_GRAD_NORM = 1.0


def no_decay(name: str, p: torch.Tensor, rule: str) -> bool:
    """Whether parameter `name` skips weight decay (and LARS/LAMB adaptation) under `rule`:
    ndim = every 1-D parameter (norm scales/shifts, biases); name = 'bn' or 'bias' in the name (the
    official ReSSL ImageNet code; timm's ResNet names match torchvision's, so its downsample BN,
    `downsample.1`, is decayed there too); none = nothing is excluded (the small-data code)."""
    if rule == "ndim":
        return p.ndim <= 1
    if rule == "name":
        return "bn" in name or "bias" in name
    if rule == "none":
        return False
    raise ValueError(f"optim.weight_decay_filter={rule!r}: use ndim, name or none")


def param_groups(model: nn.Module, weight_decay: float, rule: str = "ndim") -> List[dict]:
    """Split trainable parameters into a decayed group and a group with weight_decay 0 (`no_decay`)."""
    decay, excluded = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (excluded if no_decay(name, p, rule) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": excluded, "weight_decay": 0.0},
    ]


def fused_supported(device: torch.device) -> bool:
    """torch's fused SGD kernels exist for CUDA and CPU (torch >= 2.4)."""
    return device.type in ("cuda", "cpu")


def apex_fused_lamb(device: torch.device) -> Tuple[Optional[type], str]:
    """(apex's FusedLAMB class, "") when usable here, else (None, the reason).

    apex is not on PyPI (the PyPI package named `apex` is an unrelated web toolkit, so `import apex`
    alone proves nothing); it ships in NVIDIA's NGC PyTorch containers, and its fused kernels need CUDA.
    """
    if device.type != "cuda":
        return None, f"apex FusedLAMB needs CUDA parameters, the device is {device.type}"
    try:
        from apex.optimizers import FusedLAMB  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a broken build raising something else at import
        return None, f"apex.optimizers is not importable ({type(e).__name__}: {e})"
    return FusedLAMB, ""


def _lamb_kwargs(cfg: OptimConfig, lr: float) -> dict:
    return dict(lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                max_grad_norm=LAMB_MAX_GRAD_NORM)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                    device: torch.device) -> Tuple[torch.optim.Optimizer, str]:
    """Returns (optimizer, a short description of the implementation for the log).

    lr is the run's peak LR (already scaled to the global batch); the schedule overwrites it per step.
    A requested implementation that cannot be used here (impl=apex without apex or CUDA) falls back to
    timm, and the description says so and why.
    """
    groups = param_groups(model, cfg.weight_decay, cfg.weight_decay_filter)
    fused = fused_supported(device) if cfg.fused is None else cfg.fused
    kernel = "fused" if fused else "foreach"
    excluded = "norm/bias excluded from adaptation and decay"
    if cfg.name == "sgd" and cfg.impl in ("auto", "torch"):
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused)
        return opt, f"torch SGD (momentum {cfg.momentum}, {kernel})"
    if cfg.name == "adamw" and cfg.impl in ("auto", "torch"):
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)
        return opt, f"torch AdamW (betas {tuple(cfg.betas)}, eps {cfg.eps:g}, {kernel})"
    if cfg.name == "lars" and cfg.impl in ("auto", "timm"):
        from timm.optim import Lars

        opt = Lars(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                   trust_coeff=cfg.trust_coeff, trust_clip=False, always_adapt=False)
        return opt, f"timm Lars (momentum {cfg.momentum}, trust coeff {cfg.trust_coeff:g}, {excluded})"
    if cfg.name == "lamb" and cfg.impl in ("auto", "timm", "apex"):
        fallback = ""
        if cfg.impl == "apex":
            fused_lamb, reason = apex_fused_lamb(device)
            if fused_lamb is not None:
                try:
                    # use_nvlamb=False: no trust ratio for the weight_decay=0 group (norm/bias);
                    # adam_w_mode=True adds the decay to the update, as timm's Lamb does.
                    opt = fused_lamb(groups, adam_w_mode=True, use_nvlamb=False, **_lamb_kwargs(cfg, lr))
                    return opt, (f"apex FusedLAMB (betas {tuple(cfg.betas)}, eps {cfg.eps:g}, "
                                 f"grad-norm clip {LAMB_MAX_GRAD_NORM:g}, {excluded})")
                except RuntimeError as e:  # apex built without its CUDA extensions (amp_C)
                    reason = f"apex FusedLAMB cannot be built ({e})"
            fallback = f"; optim.impl=apex fell back to timm: {reason}"
        from timm.optim import Lamb

        opt = Lamb(groups, always_adapt=False, trust_clip=False, **_lamb_kwargs(cfg, lr))
        return opt, (f"timm Lamb (betas {tuple(cfg.betas)}, eps {cfg.eps:g}, "
                     f"grad-norm clip {LAMB_MAX_GRAD_NORM:g}, {excluded}){fallback}")
    raise ValueError(f"optim.name={cfg.name!r} with optim.impl={cfg.impl!r} is not supported")


@torch.no_grad()
def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create SGD's momentum buffers (zeros) before the first step, so no step is a "first step".

    torch's fused SGD, on a step whose momentum buffers do not exist yet, allocates them with
    `empty_like` and lets the kernel fill them with the gradient; with `found_inf` set (a skipped
    step: non-finite loss, or an fp16 GradScaler overflow, ordinary at step 1) the kernel returns
    early and the uninitialised buffers survive; the next clean step then writes their garbage
    (NaN on CPU, measured: 24 student tensors) into the weights. A zero buffer is exact: with
    dampening 0 the regular update buf = momentum * 0 + grad equals the first step's buf = grad.
    AdamW (torch) creates zero state before its kernel and rolls back its step count on found_inf;
    timm's LARS/LAMB never see found_inf (the guard skips their step() on the host). A state already
    present (a resumed checkpoint) is left as it is.
    """
    for group in optimizer.param_groups:
        if not isinstance(optimizer, torch.optim.SGD) or group.get("momentum", 0) == 0:
            continue
        if group.get("dampening", 0) != 0:
            raise ValueError("materialize_state: SGD with dampening != 0 has a special first step")
        for p in group["params"]:
            st = optimizer.state[p]
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
