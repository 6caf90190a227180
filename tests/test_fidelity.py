"""Fidelity to the official ReSSL code (issue 12): initialisation, weight-decay filter, BN groups."""
import pytest
import torch
import torch.nn as nn

from fast_ressl import train as T
from fast_ressl.config import ConfigError, ModelConfig, OptimConfig, load_config
from fast_ressl.dist import Env
from fast_ressl.model import GroupedBatchNorm, build_student_teacher, create_backbone, group_batchnorm
from fast_ressl.optim import param_groups


def _zero_bn_weights(m):
    return [n for n, p in m.named_parameters() if p.ndim == 1 and "bn" in n and n.endswith("weight")
            and float(p.detach().abs().sum()) == 0.0]


# ----------------------------------------------------------------------------- initialisation
def test_resnets_start_like_the_official_code():
    """The official code builds torchvision ResNets with zero_init_residual=False; timm zeroes the
    last BN weight of every block by default (8 in ResNet-18), which changed the learning curve."""
    assert _zero_bn_weights(create_backbone(ModelConfig(backbone="resnet18"))) == []
    assert len(_zero_bn_weights(create_backbone(ModelConfig(backbone="resnet18", zero_init_last=True)))) == 8


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100"])
def test_families_without_the_option_never_zero_init(name):
    assert _zero_bn_weights(create_backbone(ModelConfig(backbone=name))) == []
    with pytest.raises(ValueError, match="model.zero_init_last"):
        create_backbone(ModelConfig(backbone=name, zero_init_last=True))


# ----------------------------------------------------------------------------- weight decay
@pytest.mark.parametrize("rule,downsample_bn_decayed,bn_decayed,bias_decayed", [
    ("ndim", False, False, False), ("name", True, False, False), ("none", True, True, True)])
def test_weight_decay_filter(rule, downsample_bn_decayed, bn_decayed, bias_decayed):
    cfg = ModelConfig(backbone="resnet18", proj_hidden_dim=32, proj_dim=16)
    student, _ = build_student_teacher(cfg, torch.device("cpu"))
    decay, excluded = param_groups(student, 1e-4, rule)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert len(decayed) + len(excluded["params"]) == len(names)
    assert ("backbone.layer2.0.downsample.1.weight" in decayed) == downsample_bn_decayed
    assert ("backbone.bn1.weight" in decayed) == bn_decayed
    assert ("projector.0.bias" in decayed) == bias_decayed
    assert "backbone.conv1.weight" in decayed


def test_weight_decay_filter_is_a_checked_key():
    with pytest.raises(ConfigError, match="optim.weight_decay_filter"):
        load_config(None, ["optim.weight_decay_filter=bn"])
    assert OptimConfig().weight_decay_filter == "ndim"


# ----------------------------------------------------------------------------- BN groups
@pytest.mark.parametrize("shape", [(16, 3, 5, 5), (8, 6)])
def test_grouped_bn_matches_per_group_batchnorm(shape):
    """Group j holds samples j, j+G', j+2G', ... (G' = N / group_size groups); each is normalised
    with its own statistics; running statistics move by the mean over groups."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(shape[1]) if len(shape) == 4 else nn.BatchNorm1d(shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref_bns = []
    x = torch.randn(*shape) * 3 + 1
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    groups = shape[0] // 4
    want = torch.empty_like(x)
    for j in range(groups):
        ref = type(bn)(shape[1])
        ref.load_state_dict(bn.state_dict())
        idx = torch.arange(j, shape[0], groups)
        want[idx] = ref(x[idx])
        ref_bns.append(ref)
    net = nn.Sequential(bn)
    assert group_batchnorm(net, 4) == 1 and isinstance(bn, GroupedBatchNorm)
    got = net(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if x.dim() == 4:
        assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bn.running_mean, torch.stack([r.running_mean for r in ref_bns]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([r.running_var for r in ref_bns]).mean(0))
    bn.eval()
    torch.testing.assert_close(net(x), nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight,
                                                                bn.bias, False, 0.1, bn.eps))


def test_bn_groups_in_a_run(tmp_path):
    """bn_group_size: every BN of student and teacher grouped (the flat BN buffers keep working),
    the teacher shuffles its batch on one rank (auto policy), and a short run trains."""
    over = ["data.source=synthetic", "data.num_samples=32", "data.weak={size: 32}", "data.strong=[{size: 32}]",
            "model.backbone=test_resnet", "model.proj_hidden_dim=32", "model.proj_dim=16",
            "model.proj_bn=true", "model.bn_group_size=4", "method.queue_size=64", "method.compile_loss=false",
            "train.batch_size=8", "train.epochs=1", f"run.dir={tmp_path}"]
    cfg = load_config(None, over)
    student, teacher = build_student_teacher(cfg.model, torch.device("cpu"))
    bns = [m for net in (student, teacher) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, GroupedBatchNorm) and m.group_size == 4 for m in bns)
    assert T.teacher_bn_policy(cfg, Env(device=torch.device("cpu"))) == "shuffle"
    summary = T.train(cfg, live=False)
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0
    assert summary["final_loss"] == summary["final_loss"]  # finite
    with pytest.raises(ConfigError, match="model.bn_group_size"):
        load_config(None, over + ["model.bn_group_size=3"])


# ----------------------------------------------------------------------------- collapse indicators
def test_collapse_indicators_match_a_float64_derivation():
    from fast_ressl.ressl import collapse_indicators

    gen = torch.Generator().manual_seed(0)
    k = nn.functional.normalize(torch.randn(6, 5, generator=gen), dim=1)
    queue = nn.functional.normalize(torch.randn(20, 5, generator=gen) + 0.5, dim=1)
    got = collapse_indicators(k, queue, 0.04)
    k64, q64 = k.double(), queue.double()
    p = torch.softmax(k64 @ q64.T / 0.04, dim=1)
    entropy = float(-(p * p.log()).sum(1).mean() / torch.log(torch.tensor(20.0, dtype=torch.float64)))
    cos = q64 @ q64.T
    mean_cos = float((cos.sum() - cos.diag().sum()) / (20 * 19))
    assert got.tolist() == pytest.approx([entropy, mean_cos], rel=1e-5, abs=1e-6)
    same = queue[:1].repeat(20, 1)  # a fully collapsed queue
    assert collapse_indicators(k, same, 0.04).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_a_collapsed_relation_is_logged_and_warned(tmp_path, capsys):
    """tau_t = 1000 makes every teacher target uniform: the metrics say so at every log step, and
    the run warns once the queue holds only its own keys (step 8 = 64 / 8), not before."""
    over = ["data.source=synthetic", "data.num_samples=32", "data.weak={size: 32}", "data.strong=[{size: 32}]",
            "model.backbone=test_resnet", "model.proj_hidden_dim=32", "model.proj_dim=16",
            "method.queue_size=64", "method.compile_loss=false", "method.tau_t=1000", "train.batch_size=8",
            "train.epochs=3", "train.log_every=2", f"run.dir={tmp_path}"]
    T.train(load_config(None, over), live=False)
    out = capsys.readouterr().out
    import json

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(r["target_entropy_frac"] > 0.99 for r in rows)
    assert all(-1.0 <= r["queue_mean_cos"] <= 1.0 for r in rows)
    assert out.count("warning: the relation looks collapsed") == 1
    assert "looks collapsed at step 8:" in out
    assert "H/logK" in out


# ----------------------------------------------------------------------------- augmentations
def test_contrast_pivots_on_each_images_mean_like_torchvision():
    """torchvision's (and PIL's) contrast blends an image with its own mean grey level; DALI's
    color_twist pivots on 128 instead (measured here: 25-36 levels off on dark and light images)."""
    np = pytest.importorskip("numpy")
    dali = pytest.importorskip("nvidia.dali")
    import torchvision.transforms.functional as TF
    from nvidia.dali import fn

    from pipelines_dali.augment import contrast_own_mean

    rng = np.random.default_rng(0)
    imgs = [np.clip(rng.normal(m, 25, (20, 30, 3)) + rng.normal(0, 10, (1, 1, 3)), 0, 255).astype(np.uint8)
            for m in (40, 60, 128, 200, 215)]
    factors = [0.6, 1.4, 0.6, 1.4, 0.6]

    @dali.pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: imgs, batch=True, layout="HWC")
        f = fn.external_source(source=lambda: [np.float32(v) for v in factors], batch=True)
        return contrast_own_mean(x, f), fn.color_twist(x, contrast=f)

    p = pipe()
    p.build()
    ours, mid_grey = p.run()
    for i, (img, f) in enumerate(zip(imgs, factors)):
        want = TF.adjust_contrast(torch.from_numpy(img).permute(2, 0, 1), f).permute(1, 2, 0).numpy().astype(int)
        got = np.array(ours.at(i)).astype(int)
        assert np.abs(got - want).max() <= 1, i  # rounding (DALI) vs truncation (torchvision)
        if i != 2:  # the mid-grey image is the one where both pivots agree
            assert abs((np.array(mid_grey.at(i)).astype(int) - want).mean()) > 20


def test_strong_view_contrast_leaves_flat_dark_and_light_images_alone(tmp_path):
    """Contrast around the image's own mean cannot change a flat image, whatever the factor; the
    old mid-grey pivot moved a flat grey of 40 by up to 35 levels. The real strong view, only the
    contrast jitter on (p=1, factor in [0.6, 1.4])."""
    pytest.importorskip("nvidia.dali")
    from PIL import Image

    from pipelines_dali.loader import DaliTrainLoader

    for c, level in enumerate((40, 60, 200, 215)):
        (tmp_path / f"c{c}").mkdir()
        for i in range(4):
            Image.new("RGB", (48, 40), (level, level, level)).save(tmp_path / f"c{c}" / f"{i}.jpg", quality=95)
    over = ["data.source=folder", f"data.root={tmp_path}", "data.weak={size: 32}", "data.strong=[{size: 32}]",
            "train.batch_size=8", "method.queue_size=64", "data.num_threads=1", "data.dtype=fp32",
            "data.augment.jitter_p=1.0", "data.augment.brightness=0.0", "data.augment.saturation=0.0",
            "data.augment.hue=0.0", "data.augment.contrast=0.4", "data.augment.grayscale_p=0.0",
            "data.augment.blur_p=0.0"]
    cfg = load_config(None, over)
    loader = DaliTrainLoader(cfg, 0, 1, torch.device("cpu"), progress=False)
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    for _ in range(2):
        b = next(loader)
        weak, strong = (b.x_weak * std + mean) * 255, (b.x_strong[0] * std + mean) * 255
        levels = weak.flatten(1).mean(1)  # each flat image's level, unjittered
        assert set(levels.round().int().tolist()) <= {40, 60, 200, 215}
        assert (strong - levels.view(-1, 1, 1, 1)).abs().max() <= 1.5


def test_projector_output_bn_centres_each_batch():
    """model.proj_out_bn: BatchNorm1d without affine parameters on the projection, before the L2
    normalisation: a direction shared by every key (the demo's collapse) is removed in train mode."""
    cfg = ModelConfig(backbone="test_resnet", proj_hidden_dim=32, proj_dim=16, proj_out_bn=True)
    student, teacher = build_student_teacher(cfg, torch.device("cpu"))
    for net in (student, teacher):
        out_bn = net.projector[-1]
        assert isinstance(out_bn, nn.BatchNorm1d) and not out_bn.affine
    with torch.no_grad():
        student.projector[-2].bias.fill_(5.0)  # a large offset shared by every embedding
    z = student(torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert z.mean(0).abs().max() < 1e-5  # centred per batch
    plain, _ = build_student_teacher(ModelConfig(backbone="test_resnet", proj_hidden_dim=32, proj_dim=16),
                                     torch.device("cpu"))
    assert isinstance(plain.projector[-1], nn.Linear)  # off by default: the official head
