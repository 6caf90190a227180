"""Student and teacher networks: a timm backbone + projector (+ predictor on the student only)."""
from __future__ import annotations

import copy
from typing import List, Tuple

import timm
import torch
import torch.nn as nn

from .config import ModelConfig


class Encoder(nn.Module):
    """backbone (timm, num_classes=0: pooled features) -> projector [-> predictor].

    forward: x (N, 3, H, W) -> (N, proj_dim) un-normalised embeddings. The loop L2-normalises.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        try:
            self.backbone = timm.create_model(cfg.backbone, num_classes=0, pretrained=False)
        except RuntimeError as e:  # timm raises RuntimeError('Unknown model (...)')
            raise ValueError(f"model.backbone={cfg.backbone!r}: {e}") from None
        if cfg.small_input_stem:
            _small_input_stem(self.backbone, cfg.backbone)
        # Pooled output width: timm models with a conv head after pooling (MobileNetV3) report it as
        # head_hidden_size (num_features is the width before that head).
        feat = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        # Official ImageNet projector: Linear-ReLU-Linear with no BN.
        self.projector = nn.Sequential(
            nn.Linear(feat, cfg.proj_hidden_dim),
            *([nn.BatchNorm1d(cfg.proj_hidden_dim)] if cfg.proj_bn else []), nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden_dim, cfg.proj_dim))
        self.predictor: nn.Module | None = None
        if cfg.predictor:  # extended ReSSL, our reading: Linear-BN-ReLU-Linear, student only
            self.predictor = nn.Sequential(
                nn.Linear(cfg.proj_dim, cfg.pred_hidden_dim), nn.BatchNorm1d(cfg.pred_hidden_dim),
                nn.ReLU(inplace=True), nn.Linear(cfg.pred_hidden_dim, cfg.proj_dim))

    def forward(self, x: torch.Tensor | List[torch.Tensor]) -> torch.Tensor:
        """x (N, 3, H, W) -> (N, D); or a list of V views (N, 3, h_v, w_v) -> (V, N, D), each view
        its own batch (own BN statistics). One call for all views keeps DDP to one forward per step."""
        if isinstance(x, (list, tuple)):
            return torch.stack([self.forward(v) for v in x])
        z = self.projector(self.backbone(x))
        return self.predictor(z) if self.predictor is not None else z


def _small_input_stem(backbone: nn.Module, name: str) -> None:
    """CIFAR-style stem (3x3 stride-1 conv, no max-pool) for 32-64 px inputs, as the small-data
    ReSSL code uses: a 7x7/2 conv + pool would leave a 32 px image at 8x8 before the first block."""
    conv = getattr(backbone, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"model.small_input_stem: {name} has no single conv1 stem to replace")
    backbone.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    backbone.maxpool = nn.Identity()


def build_student_teacher(cfg: ModelConfig, device: torch.device,
                          channels_last: bool = True) -> Tuple[Encoder, Encoder]:
    """Student (trainable) and teacher (frozen EMA copy, no predictor), both in train mode: the
    teacher's BatchNorm uses the statistics of its own batch, as in the reference."""
    student = Encoder(cfg)
    teacher = copy.deepcopy(student)
    teacher.predictor = None
    for p in teacher.parameters():
        p.requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(device=device, memory_format=fmt)
    teacher.to(device=device, memory_format=fmt)
    return student, teacher


def ema_pairs(student: nn.Module, teacher: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Matching (teacher, student) parameter lists, cached once so EMA is a single foreach call."""
    s_params = dict(student.named_parameters())
    t_list, s_list = [], []
    for name, t in teacher.named_parameters():
        t_list.append(t)
        s_list.append(s_params[name])
    return t_list, s_list


@torch.no_grad()
def ema_update_(teacher_params: List[torch.Tensor], student_params: List[torch.Tensor],
                m: float, enabled: torch.Tensor | None = None) -> None:
    """teacher <- m * teacher + (1 - m) * student, one multi-tensor op over all parameters.

    lerp(t, s, w) = t + w (s - t) with w = 1 - m; torch's lerp switches to s - (s - t)(1 - w) for
    w >= 0.5, so m = 0 copies the student exactly and m = 1 leaves the teacher untouched.
    `enabled` (0-dim bool device tensor) turns the update into a no-op (w = 0) without a host sync,
    for steps the non-finite guard skips.
    """
    if enabled is None:
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)
        return
    w = enabled.to(teacher_params[0].dtype) * (1.0 - m)
    torch._foreach_lerp_(teacher_params, student_params, [w] * len(teacher_params))


def convert_sync_bn(teacher: nn.Module) -> nn.Module:
    """Teacher BN policy 'sync': batch statistics over all ranks (CUDA only in torch)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
