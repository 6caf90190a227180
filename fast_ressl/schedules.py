"""Every schedule is a pure function of the global step (0-based, the step about to run)."""
from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up per iteration from 0 at the first step (step 0) towards base_lr, then
    half-cosine from base_lr to min_lr, as the official code (lr * T / warmup_iters, T counting
    iterations from 0; shared/method/ressl.md). It started at base_lr/warmup_steps, one step
    ahead (found in review).

    base_lr is already scaled to the global batch (lr_per_256 * batch / 256).
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def momentum_at(step: int, base: float, total_steps: int, schedule: str = "constant",
                end: float = 1.0) -> float:
    """Teacher EMA momentum m. 'cosine' goes from base to end over the run (BYOL's schedule)."""
    if schedule == "constant":
        return base
    t = min(1.0, step / max(1, total_steps))
    return end - (end - base) * 0.5 * (1.0 + math.cos(math.pi * t))


def relation_weight_at(step: int, warmup_steps: int, handover: str = "hard") -> float:
    """Weight of the relation loss against the InfoNCE warm-up: 0 -> 1.

    hard:   0 during the warm-up, then 1.
    linear: ramps linearly from 0 at step 0 to 1 at the end of the warm-up.
    """
    if step >= warmup_steps:
        return 1.0
    if handover == "hard":
        return 0.0
    return step / warmup_steps
