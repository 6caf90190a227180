"""Optimizers: parameter groups, norm/bias exclusions, one step of each on CPU, apex selection."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

from fast_ressl.config import ConfigError, OptimConfig, load_config
from fast_ressl.optim import LAMB_MAX_GRAD_NORM, apex_fused_lamb, build_optimizer, param_groups

CPU = torch.device("cpu")
NAMES = ("sgd", "lars", "lamb", "adamw")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3),
    )
    model[0].weight.requires_grad_(False)  # a frozen parameter must not reach the optimizer
    return model


def cfg_for(name: str, **kw) -> OptimConfig:
    return OptimConfig(name=name, weight_decay=0.1, **kw)


def ids(params) -> set:
    return {id(p) for p in params}


def test_param_groups_split_decay_from_norm_and_bias():
    model = tiny_model()
    groups = param_groups(model, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == ids([model[5].weight, model[7].weight])
    assert ids(no_decay["params"]) == ids([model[1].weight, model[1].bias, model[5].bias,
                                           model[6].weight, model[6].bias, model[7].bias])
    assert id(model[0].weight) not in ids(decay["params"]) | ids(no_decay["params"])


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_keeps_the_groups_and_takes_one_step(name):
    model = tiny_model()
    opt, desc = build_optimizer(model, cfg_for(name), lr=0.1, device=CPU)
    assert isinstance(desc, str) and desc
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3, 8, 8)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    moved = [not torch.equal(b, a) for b, a in zip(before, after)]
    assert moved[0] is False  # frozen conv weight
    assert all(moved[1:]), f"{name}: some trainable parameter did not move"
    # The state survives a checkpoint round trip (resume rebuilds the optimizer, then loads it).
    opt2, _ = build_optimizer(model, cfg_for(name), lr=0.1, device=CPU)
    opt2.load_state_dict(opt.state_dict())
    model.zero_grad()
    model(x).square().mean().backward()
    opt2.step()


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_saved_state_is_bitwise_exact(name, tmp_path):
    """Three steps in one go equal one step, a save/`weights_only` load into a fresh optimizer (as
    a resume does), then two more steps: every state entry (momentum, Adam moments, LAMB's step
    counter in the param group) survives the checkpoint."""
    def grads(model, k):
        gen = torch.Generator().manual_seed(100 + k)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = 1e-2 * torch.randn(p.shape, generator=gen)

    cfg = cfg_for(name, lr=0.1)
    model_a = tiny_model()
    opt_a, _ = build_optimizer(model_a, cfg, lr=0.1, device=CPU)
    for k in range(3):
        grads(model_a, k)
        opt_a.step()

    model_b = tiny_model()
    opt_b, _ = build_optimizer(model_b, cfg, lr=0.1, device=CPU)
    grads(model_b, 0)
    opt_b.step()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    sd = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model_b = tiny_model()
    model_b.load_state_dict(sd["model"])
    opt_b, _ = build_optimizer(model_b, cfg, lr=0.1, device=CPU)
    opt_b.load_state_dict(sd["optim"])
    for k in (1, 2):
        grads(model_b, k)
        opt_b.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name,impl_word", [("sgd", "torch SGD"), ("adamw", "torch AdamW"),
                                            ("lars", "timm Lars"), ("lamb", "timm Lamb")])
def test_description_names_the_implementation(name, impl_word):
    _, desc = build_optimizer(tiny_model(), cfg_for(name), lr=0.1, device=CPU)
    assert desc.startswith(impl_word), desc


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_torch_optimizers_use_the_fused_kernel_on_cpu(name):
    opt, desc = build_optimizer(tiny_model(), cfg_for(name), lr=0.1, device=CPU)
    assert opt.defaults["fused"] is True and "fused" in desc
    opt, desc = build_optimizer(tiny_model(), cfg_for(name, fused=False), lr=0.1, device=CPU)
    assert not opt.defaults["fused"] and "foreach" in desc


@pytest.mark.parametrize("name", NAMES)
def test_norm_and_bias_get_no_weight_decay(name):
    """With zero gradients only weight decay moves a parameter: the decay group moves, the
    norm/bias group stays exactly where it is."""
    model = tiny_model()
    opt, _ = build_optimizer(model, cfg_for(name), lr=0.1, device=CPU)
    decay, no_decay = opt.param_groups
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for p in no_decay["params"]:
        assert torch.equal(p, before[id(p)]), f"{name}: a norm/bias parameter was decayed"
    for p in decay["params"]:
        assert not torch.equal(p, before[id(p)]), f"{name}: a weight was not decayed"


def _grads(model: nn.Module) -> None:
    torch.manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = 1e-3 * torch.randn_like(p)  # small: LAMB's global grad-norm clip stays inactive


def test_lars_adapts_weights_but_not_norm_and_bias():
    """First step, re-derived: decay group p -= lr * eta*||w||/(||g||+wd*||w||) * (g + wd*w);
    norm/bias group p -= lr * g (plain momentum SGD, no trust ratio)."""
    model, lr, eta, wd = tiny_model(), 0.5, 0.001, 0.1
    opt, _ = build_optimizer(model, cfg_for("lars", trust_coeff=eta), lr=lr, device=CPU)
    _grads(model)
    decay, no_decay = opt.param_groups
    expected = {}
    for p in decay["params"]:
        w, g = p.detach().double(), p.grad.double()
        ratio = eta * w.norm() / (g.norm() + wd * w.norm())
        expected[id(p)] = w - lr * ratio * (g + wd * w)
    for p in no_decay["params"]:
        expected[id(p)] = p.detach().double() - lr * p.grad.double()
    opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            torch.testing.assert_close(p.detach().double(), expected[id(p)], rtol=1e-5, atol=1e-7)


def test_lamb_adapts_weights_but_not_norm_and_bias():
    """First step, re-derived: the bias-corrected Adam direction is g/(|g|+eps); the decay group adds
    wd*w and scales by ||w||/||update||; the norm/bias group takes the Adam direction unscaled."""
    model, lr, wd, eps = tiny_model(), 0.01, 0.1, 1e-6
    opt, _ = build_optimizer(model, cfg_for("lamb", eps=eps), lr=lr, device=CPU)
    _grads(model)
    grad_norm = torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"]]).norm()
    assert grad_norm < LAMB_MAX_GRAD_NORM
    decay, no_decay = opt.param_groups
    expected = {}
    for p in decay["params"]:
        w, g = p.detach().double(), p.grad.double()
        update = g / (g.abs() + eps) + wd * w
        expected[id(p)] = w - lr * (w.norm() / update.norm()) * update
    for p in no_decay["params"]:
        w, g = p.detach().double(), p.grad.double()
        expected[id(p)] = w - lr * g / (g.abs() + eps)
    opt.step()
    for g in opt.param_groups:
        for p in g["params"]:
            torch.testing.assert_close(p.detach().double(), expected[id(p)], rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- apex selection
def test_apex_on_cpu_falls_back_to_timm_and_says_why():
    opt, desc = build_optimizer(tiny_model(), cfg_for("lamb", impl="apex"), lr=0.1, device=CPU)
    assert type(opt).__module__.startswith("timm")
    assert desc.startswith("timm Lamb") and "fell back" in desc and "CUDA" in desc


def test_apex_absent_falls_back_to_timm_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", None)  # `import apex...` raises ImportError
    monkeypatch.setitem(sys.modules, "apex.optimizers", None)
    cls, reason = apex_fused_lamb(torch.device("cuda"))
    assert cls is None and "not importable" in reason
    opt, desc = build_optimizer(tiny_model(), cfg_for("lamb", impl="apex"), lr=0.1,
                                device=torch.device("cuda"))
    assert type(opt).__module__.startswith("timm")
    assert "fell back to timm" in desc and "not importable" in desc


def test_unrelated_pypi_apex_package_is_not_mistaken_for_nvidia_apex(monkeypatch):
    monkeypatch.setitem(sys.modules, "apex", types.ModuleType("apex"))  # no `optimizers` inside
    monkeypatch.delitem(sys.modules, "apex.optimizers", raising=False)
    cls, reason = apex_fused_lamb(torch.device("cuda"))
    assert cls is None and "not importable" in reason


class _FakeFusedLAMB(torch.optim.Optimizer):
    calls: list = []

    def __init__(self, params, lr, betas, eps, weight_decay, max_grad_norm, adam_w_mode, use_nvlamb):
        _FakeFusedLAMB.calls.append(dict(adam_w_mode=adam_w_mode, use_nvlamb=use_nvlamb,
                                         max_grad_norm=max_grad_norm))
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def step(self, closure=None):
        return None


def _fake_apex(monkeypatch, cls) -> None:
    apex = types.ModuleType("apex")
    optimizers = types.ModuleType("apex.optimizers")
    optimizers.FusedLAMB = cls
    apex.optimizers = optimizers
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)


def test_apex_fused_lamb_is_used_when_present(monkeypatch):
    _fake_apex(monkeypatch, _FakeFusedLAMB)
    _FakeFusedLAMB.calls.clear()
    opt, desc = build_optimizer(tiny_model(), cfg_for("lamb", impl="apex"), lr=0.1,
                                device=torch.device("cuda"))
    assert isinstance(opt, _FakeFusedLAMB) and desc.startswith("apex FusedLAMB")
    # norm/bias (weight_decay 0) excluded from the trust ratio; decay added to the update as in timm
    assert _FakeFusedLAMB.calls == [dict(adam_w_mode=True, use_nvlamb=False, max_grad_norm=LAMB_MAX_GRAD_NORM)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # impl=auto never picks apex: the same numerics as CI wherever apex happens to be installed
    _, desc = build_optimizer(tiny_model(), cfg_for("lamb"), lr=0.1, device=torch.device("cuda"))
    assert desc.startswith("timm Lamb")


def test_apex_without_cuda_extensions_falls_back(monkeypatch):
    class Broken:
        def __init__(self, *a, **kw):
            raise RuntimeError("apex.optimizers.FusedLAMB requires cuda extensions")

    _fake_apex(monkeypatch, Broken)
    opt, desc = build_optimizer(tiny_model(), cfg_for("lamb", impl="apex"), lr=0.1,
                                device=torch.device("cuda"))
    assert type(opt).__module__.startswith("timm") and "requires cuda extensions" in desc


# ----------------------------------------------------------------------------- config keys
@pytest.mark.parametrize("overrides", [
    ["optim.name=lars"], ["optim.name=lamb", "optim.impl=apex"], ["optim.name=adamw", "optim.impl=torch"],
    ["optim.name=lamb", "optim.betas=[0.9,0.99]", "optim.eps=1e-8"], ["optim.name=lars", "optim.trust_coeff=0.02"],
])
def test_config_accepts(overrides):
    load_config(None, overrides + ["data.source=synthetic"])


@pytest.mark.parametrize("overrides,key", [
    (["optim.name=lion"], "optim.name"),
    (["optim.name=sgd", "optim.impl=apex"], "optim.impl"),
    (["optim.name=lars", "optim.impl=apex"], "optim.impl"),  # apex has no LARS
    (["optim.name=adamw", "optim.impl=timm"], "optim.impl"),
    (["optim.impl=cuda"], "optim.impl"),
    (["optim.name=lamb", "optim.betas=[0.9]"], "optim.betas"),
    (["optim.name=lamb", "optim.betas=[0.9,1.0]"], "optim.betas"),
    (["optim.eps=0"], "optim.eps"),
    (["optim.trust_coeff=-1"], "optim.trust_coeff"),
])
def test_config_rejects_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides + ["data.source=synthetic"])
