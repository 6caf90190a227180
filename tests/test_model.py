"""Student/teacher construction and the EMA update."""
import pytest
import torch

from fast_ressl.config import ModelConfig
from fast_ressl.model import Encoder, build_student_teacher, ema_pairs, ema_update_

TINY = ModelConfig(backbone="test_resnet", proj_hidden_dim=32, proj_dim=16)


def _pair(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY.__dict__, **kw})
    return build_student_teacher(cfg, torch.device("cpu"))


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))


def test_teacher_is_frozen_copy_without_predictor():
    student, teacher = _pair(predictor=True, pred_hidden_dim=24)
    assert student.predictor is not None and teacher.predictor is None
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert student(x).shape == teacher(x).shape == (4, 16)
    t, s = ema_pairs(student, teacher)
    assert len(t) == len(s) == len(list(teacher.parameters()))
    assert all(a.shape == b.shape for a, b in zip(t, s))


def test_models_are_channels_last():
    student, _ = _pair()
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("m", [0.0, 1.0, 0.9, 0.999, 0.3])
def test_ema_formula(m):
    student, teacher = _pair()
    _perturb(student)
    t, s = ema_pairs(student, teacher)
    before = [x.clone() for x in t]
    ema_update_(t, s, m)
    for new, old, sp in zip(t, before, s):
        if m == 0.0:
            assert torch.equal(new, sp)  # copies the student exactly
        elif m == 1.0:
            assert torch.equal(new, old)  # leaves the teacher unchanged exactly
        else:
            torch.testing.assert_close(new, m * old + (1 - m) * sp, rtol=1e-5, atol=1e-6)


def test_unknown_backbone_names_the_key():
    with pytest.raises(ValueError, match="model.backbone"):
        Encoder(ModelConfig(backbone="no_such_net_123"))


def test_small_input_stem():
    student, _ = _pair(backbone="resnet18", small_input_stem=True)
    assert student.backbone.conv1.stride == (1, 1) and student.backbone.conv1.kernel_size == (3, 3)
    assert isinstance(student.backbone.maxpool, torch.nn.Identity)


def test_projector_bn_switch():
    plain, _ = _pair()
    with_bn, teacher = _pair(proj_bn=True)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.projector)
    assert isinstance(with_bn.projector[1], torch.nn.BatchNorm1d)
    assert isinstance(teacher.projector[1], torch.nn.BatchNorm1d)  # the teacher mirrors the student
