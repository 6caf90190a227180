"""Student and teacher networks: a timm backbone + projector (+ predictor on the student only)."""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, ModelConfig


class Encoder(nn.Module):
    """backbone (timm, num_classes=0: pooled features) -> projector [-> predictor].

    forward: x (N, 3, H, W) -> (N, proj_dim) un-normalised embeddings. The loop L2-normalises.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = create_backbone(cfg)
        # Pooled output width: timm models with a conv head after pooling (MobileNetV3) report it as
        # head_hidden_size (num_features is the width before that head).
        feat = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        # Official ImageNet projector: Linear-ReLU-Linear with no BN.
        self.projector = nn.Sequential(
            nn.Linear(feat, cfg.proj_hidden_dim),
            *([nn.BatchNorm1d(cfg.proj_hidden_dim)] if cfg.proj_bn else []), nn.ReLU(inplace=True),
            nn.Linear(cfg.proj_hidden_dim, cfg.proj_dim),
            # centres each batch's embeddings before the L2 normalisation: see ModelConfig.proj_out_bn
            *([nn.BatchNorm1d(cfg.proj_dim, affine=False)] if cfg.proj_out_bn else []))
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


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """The timm backbone of `cfg` with num_classes=0 (pooled features), randomly initialised as the
    official code (model.zero_init_last), with the small-input stem if configured."""
    try:
        try:
            backbone = timm.create_model(cfg.backbone, num_classes=0, pretrained=False,
                                         zero_init_last=cfg.zero_init_last)
        except TypeError as e:  # builders without the option (EfficientNet, MobileNetV3, ...)
            if "zero_init_last" not in str(e):
                raise
            if cfg.zero_init_last:
                raise ConfigError(f"model.zero_init_last=true: {cfg.backbone} has no zero-init-last "
                                 "option in timm (it never zero-initialises a BN); use false") from None
            backbone = timm.create_model(cfg.backbone, num_classes=0, pretrained=False)
    except RuntimeError as e:  # timm raises RuntimeError('Unknown model (...)')
        raise ConfigError(f"model.backbone={cfg.backbone!r}: {e}") from None
    if cfg.small_input_stem:
        _small_input_stem(backbone, cfg.backbone)
    return backbone


def _small_input_stem(backbone: nn.Module, name: str) -> None:
    """CIFAR-style stem (3x3 stride-1 conv, no max-pool) for 32-64 px inputs, as the small-data
    ReSSL code uses: a 7x7/2 conv + pool would leave a 32 px image at 8x8 before the first block."""
    conv = getattr(backbone, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ConfigError(f"model.small_input_stem: {name} has no single conv1 stem to replace")
    backbone.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    backbone.maxpool = nn.Identity()


def build_student_teacher(cfg: ModelConfig, device: torch.device,
                          channels_last: bool = True) -> Tuple[Encoder, Encoder]:
    """Student (trainable) and teacher (frozen EMA copy, no predictor), both in train mode: the
    teacher's BatchNorm uses the statistics of its own batch, as in the reference."""
    student = Encoder(cfg)
    if cfg.bn_group_size:
        group_batchnorm(student, cfg.bn_group_size)
    teacher = copy.deepcopy(student)
    teacher.predictor = None
    for p in teacher.parameters():
        p.requires_grad_(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    student.to(device=device, memory_format=fmt)
    teacher.to(device=device, memory_format=fmt)
    flatten_buffers([student, teacher])  # after .to(): moving a module re-creates its buffers
    return student, teacher


class GroupedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics come from groups of `group_size` images of the
    batch (SplitBatchNorm of the authors' small-data code: group j holds samples j, j+G', j+2G', ...
    with G' = N / group_size groups). Running statistics are updated with the mean over groups.
    Eval mode is plain BatchNorm. Built by `group_batchnorm` from a BatchNorm1d/2d (class swap:
    parameters and buffers stay the same tensors).

    x: (N, C) or (N, C, H, W), any memory format; the grouped normalisation needs one copy in and
    one out (the groups are not a view of a channels_last batch), so it costs more than plain BN:
    use it only to reproduce a many-GPU recipe's statistics on fewer GPUs.
    """

    group_size: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if not self.training or not self.group_size or n <= self.group_size:
            return super().forward(x)
        if n % self.group_size:
            raise ValueError(f"model.bn_group_size={self.group_size} does not divide the batch of {n}")
        groups, c, rest = n // self.group_size, x.shape[1], x.shape[2:]
        # (N, C, *rest) -> (G, groups*C, *rest): sample n = g*groups + j lands in channel block j
        xs = x.reshape(self.group_size, groups * c, *rest)
        mean_s, var_s = self.running_mean.repeat(groups), self.running_var.repeat(groups)
        out = F.batch_norm(xs, mean_s, var_s, self.weight.repeat(groups) if self.affine else None,
                           self.bias.repeat(groups) if self.affine else None, True,
                           self.momentum if self.momentum is not None else 0.1, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean_s.view(groups, c).mean(0))
            self.running_var.copy_(var_s.view(groups, c).mean(0))
            self.num_batches_tracked.add_(1)
        out = out.reshape(x.shape)
        return out.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and \
            x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else out


def group_batchnorm(module: nn.Module, group_size: int) -> int:
    """Turn every BatchNorm1d/2d of `module` into a GroupedBatchNorm of `group_size` (in place);
    returns how many."""
    count = 0
    for m in module.modules():
        if type(m) in _GROUPED:
            m.__class__ = _GROUPED[type(m)]
            m.group_size = group_size
            count += 1
    return count


# one grouped class per BatchNorm class (not one per converted module)
_GROUPED = {bn: type(f"Grouped{bn.__name__}", (GroupedBatchNorm, bn), {}) for bn in (nn.BatchNorm1d, nn.BatchNorm2d)}


# Start offsets inside a flat buffer are rounded up to this many elements (64 B for float32), so
# every BN statistics view starts as aligned as a fresh allocation's vectorised kernels expect.
_ALIGN = 16


def flatten_buffers(modules: List[nn.Module]) -> List[torch.Tensor]:
    """Re-point every buffer of `modules` to a view of one flat tensor per (device, dtype); return
    the flat tensors (1-D). Idempotent: modules already flattened return their flat tensors.

    Why: the non-finite guard snapshots and restores all BatchNorm statistics every step (a skipped
    step must not change them). ResNet-50's student and teacher hold 318 buffers; per buffer that is
    a copy, a `where` and a copy per step (~950 kernel launches on a GPU, ~735 top-level ops measured
    with torch.profiler on CPU), and `_foreach_copy_` over mixed float32/int64 lists falls back to
    one launch per tensor on CUDA. Over flat tensors it is one op per dtype. BatchNorm updates its
    statistics in place (running_mean/var, num_batches_tracked.add_), so the views keep receiving
    them; load_state_dict copies into them in place; DDP copies rank 0's into them once, in place, at its construction, and not in the forward.
    Calling `.to(device)` on the modules afterwards would replace the views: flatten after moving.
    """
    bufs = [(mod, name, b) for m in modules for mod in m.modules() for name, b in mod._buffers.items()
            if b is not None]
    bases = {id(b._base): b._base for _, _, b in bufs if b._base is not None}
    if bufs and all(b._base is not None for _, _, b in bufs) and all(
            x.dim() == 1 and getattr(x, "_fast_ressl_flat", False) for x in bases.values()):
        return list(bases.values())
    groups: Dict[Tuple[torch.device, torch.dtype], list] = {}
    for entry in bufs:
        groups.setdefault((entry[2].device, entry[2].dtype), []).append(entry)
    flats = []
    for (device, dtype), entries in groups.items():
        offsets, total = [], 0
        for _, _, b in entries:
            offsets.append(total)
            total += -(-b.numel() // _ALIGN) * _ALIGN
        flat = torch.zeros(total, dtype=dtype, device=device)
        flat._fast_ressl_flat = True  # marks it as ours for the idempotency check above
        for (mod, name, b), off in zip(entries, offsets):
            view = flat[off:off + b.numel()].view(b.shape)
            view.copy_(b)
            mod._buffers[name] = view
        flats.append(flat)
    return flats


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
    """teacher <- m * teacher + (1 - m) * student, multi-tensor ops over all parameters.

    Without `enabled`: one `_foreach_lerp_` with a scalar weight w = 1 - m; lerp(t, s, w) =
    t + w (s - t), and torch's lerp switches to s - (s - t)(1 - w) for w >= 0.5, so m = 0 copies the
    student exactly and m = 1 leaves the teacher untouched.

    `enabled` (0-dim bool device tensor, the guard's "every loss was finite") gates the update
    without a host sync: t += (enabled * (1 - m)) * (s - t) as three foreach ops (sub, mul by a
    0-dim device tensor, add), all on CUDA's multi-tensor fast path. `_foreach_lerp_` has no
    tensor-weight overload, and a list of 0-dim weights falls back to one launch per tensor on
    CUDA. A disabled step leaves the teacher bitwise unchanged (s - t is finite: the student did
    not move); an enabled one is t + w (s - t), lerp's own formula for w < 0.5 (every m > 0.5).
    """
    if enabled is None:
        torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)
        return
    w = enabled * (1.0 - m)  # 0-dim float device tensor (bool * float promotes)
    diff = torch._foreach_sub(student_params, teacher_params)
    torch._foreach_mul_(diff, w)
    torch._foreach_add_(teacher_params, diff)


def convert_sync_bn(teacher: nn.Module) -> nn.Module:
    """Teacher BN policy 'sync': batch statistics over all ranks (CUDA only in torch)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
