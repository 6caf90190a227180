"""Optimizer construction: two parameter groups (no weight decay on norm and bias parameters)."""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn

from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Split trainable parameters: weights of convs/linears get weight decay; 1-D parameters
    (BatchNorm/LayerNorm scales and shifts, biases) get none, as in the official recipe."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fused_supported(device: torch.device) -> bool:
    """torch's fused SGD kernels exist for CUDA and CPU (torch >= 2.4)."""
    return device.type in ("cuda", "cpu")


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float,
                    device: torch.device) -> Tuple[torch.optim.Optimizer, str]:
    """Returns (optimizer, a short description of the implementation for the log).

    lr is the run's peak LR (already scaled to the global batch); the schedule overwrites it per step.
    """
    groups = param_groups(model, cfg.weight_decay)
    fused = fused_supported(device) if cfg.fused is None else cfg.fused
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, fused=fused)
        return opt, f"torch SGD (momentum {cfg.momentum}, {'fused' if fused else 'foreach'})"
    raise ValueError(f"optim.name={cfg.name!r} is not supported")
