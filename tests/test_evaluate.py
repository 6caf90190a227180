"""kNN (known answers, the weighted-vote formula), linear probe, export (timm keys and loading), the
knn/linear/export CLI and the online kNN monitor."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from conftest import make_jpeg_folder
from fast_ressl import evaluate as E
from fast_ressl.cli import main
from fast_ressl.config import load_config, to_dict
from fast_ressl.datasets import FileDataset
from fast_ressl.model import build_student_teacher


# ----------------------------------------------------------------------------- kNN
def test_knn_known_answer_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:4] * 5  # 4 classes, well separated
    train_y = torch.arange(4).repeat_interleave(30)
    train = centers[train_y] + 0.3 * torch.randn(120, 8, generator=g)
    test_y = torch.tensor([3, 0, 2, 1, 1, 0])
    test = centers[test_y] + 0.3 * torch.randn(6, 8, generator=g)
    scores = E.knn_classify(train, train_y, test, num_classes=4, k=20, temperature=0.1)
    assert scores.argmax(1).tolist() == test_y.tolist()
    assert E.topk_accuracy(scores, test_y) == {"top1": 100.0, "top5": 100.0}  # top-5 capped at 4 classes
    wrong = (test_y + 1) % 4
    assert E.topk_accuracy(scores, wrong)["top1"] == 0.0


def test_knn_weighted_vote_matches_independent_computation():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(50, 6, generator=g), torch.randn(7, 6, generator=g)
    train_y = torch.randint(0, 5, (50,), generator=g)
    k, T = 9, 0.1
    scores = E.knn_classify(train, train_y, test, num_classes=5, k=k, temperature=T, chunk=3)
    for i in range(7):  # plain Python: cosine similarity, k nearest, sum exp(s/T) per class
        sims = []
        for j in range(50):
            a, b = test[i].tolist(), train[j].tolist()
            dot = sum(x * y for x, y in zip(a, b))
            sims.append((dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b)), j))
        votes = [0.0] * 5
        for s, j in sorted(sims, reverse=True)[:k]:
            votes[int(train_y[j])] += math.exp(s / T)
        assert scores[i].tolist() == pytest.approx(votes, rel=1e-4)


def test_knn_k_larger_than_train_set():
    scores = E.knn_classify(torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.randn(2, 4), 2, k=200)
    assert scores.shape == (2, 2) and torch.isfinite(scores).all()


# ----------------------------------------------------------------------------- helpers
def _cfg(tmp_path, **over):
    train, val = tmp_path / "data" / "train", tmp_path / "data" / "val"
    if not train.exists():
        make_jpeg_folder(train, classes=3, per_class=8, size=(40, 36), seed=0)
        make_jpeg_folder(val, classes=3, per_class=4, size=(40, 36), seed=1)
    items = {"model.backbone": "resnet18", "model.proj_hidden_dim": 32, "model.proj_dim": 16,
             "data.source": "folder", "data.root": str(train), "data.val_root": str(val),
             "data.loader": "torch", "data.num_threads": 1, "data.weak.size": 32,
             "data.strong": "[{size: 32}]", "data.eval_resize": 32, "data.dtype": "fp32",
             "train.batch_size": 8, "method.queue_size": 64, "run.dir": str(tmp_path / "run")}
    items.update(over)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def _checkpoint(cfg, tmp_path, perturb_teacher=True):
    torch.manual_seed(0)
    student, teacher = build_student_teacher(cfg.model, torch.device("cpu"), channels_last=False)
    if perturb_teacher:
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(0.01)
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": to_dict(cfg), "step": 7}, path)
    return path, student, teacher


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_export_keys_match_timm_and_load_with_the_readme_line(tmp_path, which):
    cfg = _cfg(tmp_path)
    ckpt, student, teacher = _checkpoint(cfg, tmp_path)
    out = tmp_path / "resnet18_ressl.safetensors"
    assert main(["export", str(tmp_path / "run"), str(out)] + (["--teacher"] if which == "teacher" else [])) == 0
    from safetensors.torch import load_file

    sd = load_file(str(out))
    ref = timm.create_model("resnet18").state_dict()
    assert set(sd) == set(ref) - {"fc.weight", "fc.bias"}  # timm's keys minus the classifier
    assert all(sd[k].shape == ref[k].shape for k in sd)
    # The README line: strict load into a headless model.
    model = timm.create_model("resnet18", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(out), num_classes=0))
    src = (teacher if which == "teacher" else student).backbone.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, src[k]), k
    # ... and with a fresh head for fine-tuning.
    model10 = timm.create_model("resnet18", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(out), num_classes=0))
    assert model10.get_classifier().out_features == 10
    assert torch.equal(model10.conv1.weight, src["conv1.weight"])
    assert E.read_export_metadata(out)["weights"] == which


def test_export_small_input_stem_loads_with_helper_and_is_refused_by_plain_timm(tmp_path):
    cfg = _cfg(tmp_path, **{"model.small_input_stem": "true"})
    _, student, _ = _checkpoint(cfg, tmp_path)
    out = tmp_path / "small.safetensors"
    E.export_backbone(tmp_path / "run", out)
    assert E.read_export_metadata(out)["small_input_stem"] == "true"
    model = E.load_exported(out)
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    assert torch.equal(model.conv1.weight, student.backbone.conv1.weight)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(RuntimeError, match="size mismatch"):
        timm.create_model("resnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(out), num_classes=0))


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x.safetensors")]) == 2
    assert "no such run directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- knn / linear CLI
def test_knn_and_linear_commands_on_a_tiny_folder(tmp_path):
    cfg = _cfg(tmp_path)
    _checkpoint(cfg, tmp_path)
    assert main(["knn", str(tmp_path / "run"), "--compare-random", "--k", "5", "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "run" / "knn.json").read_text())
    assert res["train_samples"] == 24 and res["val_samples"] == 12 and res["k"] == 5
    for key in ("pretrained", "random_init"):
        assert 0 <= res[key]["top1"] <= res[key]["top5"] <= 100

    out = tmp_path / "lin.json"
    assert main(["linear", str(tmp_path / "run" / "checkpoints" / "last.pt"), "--epochs", "3",
                 "--batch-size", "8", "--device", "cpu", "--out", str(out)]) == 0
    lin = json.loads(out.read_text())
    assert lin["epochs"] == 3 and lin["lr"] == 0.3 and lin["momentum"] == 0.9 and lin["weight_decay"] == 0
    assert lin["augment"] is True and lin["num_classes"] == 3
    assert lin["history"][-1]["epoch"] == 3  # the final epoch is reported, not the best
    assert (lin["top1"], lin["top5"]) == (lin["history"][-1]["top1"], lin["history"][-1]["top5"])
    assert lin["top5"] == 100.0  # 3 classes


def test_knn_baselines_within_memory_bounds(tmp_path, monkeypatch, capsys):
    """`fast-ressl knn --compare-random` kept every decoded crop of both sets in memory whatever
    eval.cache_mb (ImageNet at 224 px: ~385 GB in bf16), and the raw-pixel baseline holds 3*size**2
    floats an image several times (50k val images at 224 px: 30 GB a copy; found in review). Now the
    crops are kept only within eval.cache_mb (else decoded again per feature set: same figures), and
    the raw-pixel baseline is left out above RAW_PIXELS_MAX_BYTES, saying why."""
    cfg = _cfg(tmp_path)
    _checkpoint(cfg, tmp_path)
    args = ["knn", str(tmp_path / "run"), "--compare-random", "--k", "5", "--device", "cpu"]
    assert main(args) == 0
    kept = json.loads((tmp_path / "run" / "knn.json").read_text())
    assert E._images_bytes(cfg, 10) == 10 * 3 * 32 * 32 * 4  # data.dtype=fp32 here: 4 bytes a value
    monkeypatch.setattr(E, "_images_bytes", lambda cfg, n: 2 ** 60)  # nothing fits: decoded per pass
    monkeypatch.setattr(E, "RAW_PIXELS_MAX_BYTES", 36 * 3 * 32 * 32 * 4 - 1)  # 24 + 12 crops: 1 byte over
    capsys.readouterr()
    assert main(args) == 0
    again = json.loads((tmp_path / "run" / "knn.json").read_text())
    for key in ("pretrained", "random_init"):
        assert again[key] == kept[key], key
    assert "raw_pixels" in kept and "raw_pixels" not in again
    assert again["raw_pixels_left_out"].startswith("36 images x 3072 floats")
    out = capsys.readouterr().out
    assert "raw pixels left out: 36 images" in out
    # the knn.json it replaced is named (a run's three-way comparison went without a word)
    assert "(it held pretrained, random_init, raw_pixels; --out FILE keeps both)" in out


def test_linear_probe_learns_separable_features(tmp_path):
    """Cached-feature probe on a backbone whose features separate the classes perfectly."""
    cfg = _cfg(tmp_path)
    train_ds = E._dataset(cfg, cfg.data.root)
    val_ds = E._dataset(cfg, cfg.data.val_root)

    class ColourNet(torch.nn.Module):  # each generated class has its own colour statistics
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    res = E.linear_probe(ColourNet(), cfg, train_ds, val_ds, torch.device("cpu"), epochs=30,
                         batch_size=8, augment=False, log_every_epochs=30)
    assert res["history"][-1]["epoch"] == 30 and 0 <= res["top1"] <= 100


class _ColourNet(torch.nn.Module):
    """Features that separate the generated classes (each has its own colour statistics); counts the
    images it has seen."""

    seen = 0

    def forward(self, x):
        self.seen += x.shape[0]
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_linear_probe_leaves_out_a_train_file_gone_bad_since_the_scan(tmp_path, capsys):
    """The augmented probe's DataLoader used to raise on a file overwritten after the scan and end
    the probe: now the file is reported once and left out of every epoch, and the probe finishes."""
    cfg = _cfg(tmp_path)
    train_ds, val_ds = E._dataset(cfg, cfg.data.root), E._dataset(cfg, cfg.data.val_root)
    victim = train_ds.files[5]
    with open(victim, "wb") as f:
        f.write(b"garbage" * 50)
    capsys.readouterr()
    net = _ColourNet()
    res = E.linear_probe(net, cfg, train_ds, val_ds, torch.device("cpu"), epochs=3, batch_size=8,
                         augment=True, log_every_epochs=3)
    assert res["history"][-1]["epoch"] == 3 and res["train_files_left_out"] == [victim]
    assert net.seen == 12 + 3 * 23  # the val features once, then 23 of 24 train images per epoch
    assert capsys.readouterr().err.count("failed to decode in the eval pass") == 1
    # --no-augment: the train features are cached once, without the file (indexing them as if all
    # 24 were there crashed: IndexError here, a device-side assert on a GPU)
    res = E.linear_probe(_ColourNet(), cfg, train_ds, val_ds, torch.device("cpu"), epochs=2, batch_size=8,
                         augment=False, log_every_epochs=2)
    assert res["history"][-1]["epoch"] == 2


def test_probe_batches_with_workers_leave_a_bad_file_out_of_later_epochs(tmp_path, capsys):
    """The same with DataLoader workers (as for sets over 4096 files): persistent workers are
    replaced once a file is left out, so the next epoch neither meets nor reports it again."""
    cfg = _cfg(tmp_path)
    ds = E._dataset(cfg, cfg.data.root)
    batches = E._TrainBatches(cfg, ds, 32, batch_size=8, seed=0)
    batches.num_workers = 2
    victim = ds.files[17]
    want = sorted(y for f, y in zip(ds.files, ds.labels) if f != victim)
    with open(victim, "wb") as f:
        f.write(b"garbage" * 50)
    capsys.readouterr()
    for epoch in range(2):
        ys = [y for _, y in batches]
        assert sorted(torch.cat(ys).tolist()) == want, epoch
        assert capsys.readouterr().err.count("failed to decode") == (1 if epoch == 0 else 0)
    assert batches.left_out == [victim]


# ----------------------------------------------------------------------------- online monitor
def test_knn_monitor_off_says_what_to_set_in_the_run(tmp_path, capsys):
    """A folder run without data.val_root: the reason named the knn command's --train-root and
    --val-root, which `fast-ressl train` does not take."""
    from fast_ressl.train import train

    train(_cfg(tmp_path, **{"data.val_root": "null", "train.epochs": 1, "method.compile_loss": "false",
                            "eval.knn_every_epochs": 1, "train.channels_last": "false"}), live=False)
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("kNN monitor off")]
    assert "data.val_root" in line and "eval.knn_every_epochs=0" in line and "--" not in line, line


def test_online_knn_monitor_writes_metrics(tmp_path, capsys):
    from fast_ressl.train import train

    cfg = _cfg(tmp_path, **{"train.epochs": 2, "train.precision": "fp32", "method.compile_loss": "false",
                            "eval.knn_every_epochs": 1, "eval.knn_compare_random": "true",
                            "eval.knn_k": 10, "data.scan": "false", "train.channels_last": "false"})
    train(cfg, live=False)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in recs if "knn_top1" in r]
    assert [r["epoch"] for r in knn] == [0, 1]
    assert "knn_top1_random_init" in knn[-1] and "knn_top1_random_init" not in knn[0]
    final = json.loads((tmp_path / "run" / "knn.json").read_text())
    assert final["pretrained"]["top1"] == knn[-1]["knn_top1"]
    # the end-of-run comparison: three feature sets through the one kNN, recorded and printed last
    assert final["random_init"]["top1"] == knn[-1]["knn_top1_random_init"]
    assert final["raw_pixels"]["top1"] == knn[-1]["knn_top1_raw_pixels"]
    dev = torch.device("cpu")
    tr = E._CachedImages(E.eval_batches(cfg, E._dataset(cfg, cfg.data.root), dev))
    va = E._CachedImages(E.eval_batches(cfg, E._dataset(cfg, cfg.data.val_root), dev))
    assert final["raw_pixels"] == E.raw_pixel_knn(tr, va, 3, 32, dev, k=10, temperature=0.1)
    rnd = E.build_backbone(cfg, None, seed=cfg.train.seed)
    assert final["random_init"] == E.knn_eval(rnd, tr, va, 3, dev, k=10, temperature=0.1)
    out = capsys.readouterr().out.splitlines()
    # the comparison comes right before the closing lines (curves, done), and the run's very last
    # line restates its three figures
    [i] = [n for n, line in enumerate(out) if "one kNN function for all three" in line]
    assert out[i].startswith("epoch 2/2: kNN (k=10, T=0.1) val top-1") and out[i + 4].startswith("curves")
    assert out[i + 5].startswith("done") and i + 7 == len(out)
    assert out[-1] == (f"kNN top-1 (k=10, T=0.1): pretrained {final['pretrained']['top1']:.2f}%, same backbone "
                       f"random init {final['random_init']['top1']:.2f}%, raw pixels {final['raw_pixels']['top1']:.2f}%")
    p, r, x = (final[key]["top1"] for key in ("pretrained", "random_init", "raw_pixels"))
    assert out[i + 1].strip() == f"pretrained backbone          {p:6.2f}%"
    assert out[i + 2].split() == ["same", "backbone,", "random", "init", f"{r:.2f}%", "pretrained",
                               f"{p - r:+.2f}", "points", "vs", "random", "init"]
    assert out[i + 3].split() == ["raw", "pixels", "(mean-centred)", f"{x:.2f}%", "pretrained",
                               f"{p - x:+.2f}", "points", "vs", "raw", "pixels"]


def test_raw_pixel_knn_is_knn_classify_on_flattened_centred_pixels(tmp_path):
    """Known answer: the raw-pixel baseline is knn_classify (same k, T, weighted vote) on the eval
    crops flattened in (C, H, W) order, minus the training crops' mean; offline and in the monitor."""
    from types import SimpleNamespace

    cfg = _cfg(tmp_path, **{"data.weak.size": 16, "data.eval_resize": 16})
    dev = torch.device("cpu")
    tr = E._CachedImages(E.eval_batches(cfg, E._dataset(cfg, cfg.data.root), dev, 5))
    va = E._CachedImages(E.eval_batches(cfg, E._dataset(cfg, cfg.data.val_root), dev, 5))
    tx, ty = torch.cat([x for x, _ in tr]), torch.cat([y for _, y in tr])
    vx, vy = torch.cat([x for x, _ in va]), torch.cat([y for _, y in va])
    assert tx.shape == (24, 3, 16, 16) and vx.shape == (12, 3, 16, 16)
    tf = tx.reshape(24, -1).float()
    mean = tf.mean(0)
    tf, vf = tf - mean, vx.reshape(12, -1).float() - mean
    tf, vf = tf / tf.norm(dim=1, keepdim=True), vf / vf.norm(dim=1, keepdim=True)
    want = E.topk_accuracy(E.knn_classify(tf, ty, vf, 3, k=7, temperature=0.1), vy)
    assert E.raw_pixel_knn(tr, va, 3, 16, dev, k=7, temperature=0.1) == want

    env = SimpleNamespace(device=dev, distributed=False, rank=0, world_size=1, is_main=True)
    data = E._MonitorData()
    data.train, data.val, data.num_classes = tr, va, 3
    got, per_rank = E._knn_pass(E.RawPixels(16), data, env, 7, 0.1)
    assert got == want and per_rank == [36]


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_monitor_goes_on_without_a_file_an_eval_pass_left_out(tmp_path, capsys, loader):
    """A val file gone bad after the scan (on a GPU also one only PIL decodes) is reported and left out
    by the eval loader, "an online kNN check must not end a training run"; but the monitor then
    compared the images extracted with the sizes it had noted before the first pass and raised
    RuntimeError, ending the run at its first check and every later one (found in review). Now each
    rank's count is checked against what its loader still holds. Also: a block whose files were all
    left out gives no features, not torch.cat's error on one rank while the others wait."""
    from types import SimpleNamespace

    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = _cfg(tmp_path, **{"data.loader": loader, "eval.cache_mb": 0})  # no cache: every check decodes
    dev = torch.device("cpu")
    env = SimpleNamespace(device=dev, distributed=False, rank=0, world_size=1, is_main=True)
    E._MONITOR.key = None
    data = E._monitor_data(cfg, env, loader=None)
    victim = sorted((tmp_path / "data" / "val" / "class_1").iterdir())[0]
    victim.write_bytes(b"garbage" * 50)
    backbone = E.build_backbone(cfg, seed=0)
    capsys.readouterr()
    for _ in range(2):  # the check after, too
        acc, per_rank = E._knn_pass(backbone, data, env, 5, 0.1)
        assert per_rank == [24 + 11] and 0.0 <= acc["top1"] <= 100.0
    assert capsys.readouterr().err.count(str(victim)) == 1  # reported once
    E._MONITOR.key = None

    one = FileDataset([str(victim)], [1], ["class_0", "class_1", "class_2"])
    f, y = E.extract_features(backbone, E.eval_batches(cfg, one, dev), dev)
    assert f.shape == (0, E.feature_dim(backbone)) and y.shape == (0,)


def test_val_labels_follow_the_training_classes_by_name(tmp_path):
    """Each root's labels index its own sorted class folders: a val root without class_0 gave its
    class_1 images label 0 and so on, and kNN scored against the wrong classes without a word (raw-
    pixel kNN on copies of the train images: 0%). Val labels now index the training classes by
    name (100%), and a val class the training set lacks is an error naming it."""
    import shutil

    cfg = _cfg(tmp_path, **{"data.weak.size": 16, "data.eval_resize": 16})
    train = tmp_path / "data" / "train"
    val = tmp_path / "val_copies"
    for cls in ("class_1", "class_2"):
        shutil.copytree(train / cls, val / cls)
    dev = torch.device("cpu")
    tr_ds, va_ds = E._dataset(cfg, str(train)), E._dataset(cfg, str(val))
    assert va_ds.classes == ["class_1", "class_2"] and set(va_ds.labels) == {0, 1}
    mapped = E.in_train_classes(va_ds, tr_ds)
    assert mapped.classes == tr_ds.classes and set(mapped.labels) == {1, 2} and mapped.files == va_ds.files
    tr = E._CachedImages(E.eval_batches(cfg, tr_ds, dev, 8))
    assert E.raw_pixel_knn(tr, E.eval_batches(cfg, mapped, dev, 8), 3, 16, dev, k=1)["top1"] == 100.0
    assert E.raw_pixel_knn(tr, E.eval_batches(cfg, va_ds, dev, 8), 3, 16, dev, k=1)["top1"] == 0.0  # unmapped
    shutil.copytree(train / "class_0", val / "class_9")
    with pytest.raises(ValueError, match=r"1 class folder\(s\) the training set lacks \(class_9\)"):
        E.in_train_classes(E._dataset(cfg, str(val)), tr_ds)


def test_raw_pixels_centring_removes_the_shared_image():
    """Two classes that differ by a small pattern on a large shared image: uncentred, every cosine is
    about 1 and the vote is decided by noise; centred, the pattern decides (100%)."""
    g = torch.Generator().manual_seed(0)
    shared = 10 * torch.ones(48)
    pattern = torch.zeros(2, 48)
    pattern[0, :24], pattern[1, 24:] = 1.0, 1.0
    ty, vy = torch.arange(2).repeat(20), torch.arange(2).repeat(10)
    tf = shared + pattern[ty] + 0.3 * torch.randn(40, 48, generator=g)
    vf = shared + pattern[vy] + 0.3 * torch.randn(20, 48, generator=g)
    ctf, cvf = E.centre_pixels(tf, vf)
    assert torch.allclose(ctf.mean(0), torch.zeros(48), atol=1e-5)
    assert E.topk_accuracy(E.knn_classify(ctf, ty, cvf, 2, k=10), vy)["top1"] == 100.0


def test_eval_keys_are_validated_and_do_not_change_the_run_hash():
    from fast_ressl.config import ConfigError, config_hash

    syn = ["data.source=synthetic"]
    base = load_config(None, syn)
    assert config_hash(base) == config_hash(load_config(None, syn + ["eval.knn_every_epochs=3", "eval.knn_k=20"]))
    with pytest.raises(ConfigError, match="eval.knn_k"):
        load_config(None, syn + ["eval.knn_k=0"])


def test_features_are_computed_in_the_precision_the_run_trained_in():
    """kNN, the monitor and the linear probe forward the backbone in the run's train.precision on a
    GPU: fp32 for an fp32 run (the official code's), bf16 or fp16 under autocast. It was bf16 on
    every GPU (~0.35% off fp32 features for an fp32 run; found in review). (The autocast objects
    alone: this machine has no GPU, where torch disables a CUDA autocast with a warning.)"""
    import warnings

    cuda = torch.device("cuda")
    assert E._autocast(cuda, "fp32")._enabled is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available": the dtype is chosen all the same
        assert E._autocast(cuda, "bf16").fast_dtype == torch.bfloat16
        assert E._autocast(cuda, "auto").fast_dtype == torch.bfloat16
        assert E._autocast(cuda, "fp16").fast_dtype == torch.float16
    assert E._autocast(torch.device("cpu"), "bf16")._enabled is False  # CPU: fp32
    # the loader's fp16 batch goes to an fp32 forward as float32 (fp16 into fp32 weights is an error)
    half = torch.zeros(2, 3, 4, 4, dtype=torch.float16)
    assert E._eval_input(half, torch.device("cpu"), "bf16").dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_gpu_features_of_fp16_batches_in_each_precision(precision):
    """On a GPU the eval loaders hand over fp16 batches (data.dtype): an fp32 run's forward (no
    autocast) takes them as float32, a bf16/fp16 run's under autocast."""
    dev = torch.device("cuda")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).to(dev)
    batches = [(torch.randn(2, 3, 8, 8, dtype=torch.float16), torch.tensor([0, 1]))]
    f, y = E.extract_features(net, batches, dev, precision)
    assert f.shape == (2, 4) and f.dtype == torch.float32 and torch.isfinite(f).all()
