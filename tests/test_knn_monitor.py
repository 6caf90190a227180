"""The online kNN monitor in multi-rank runs (issue 10, item 5): every rank extracts the features of
its own shard and the features are gathered, so 2 gloo ranks give the 1-process result; the
training loader's scan and denylist are reused (a custom `data.denylist` never rescans the training
set); the validation set is scanned once, each rank decoding its share."""
from __future__ import annotations

import json
import os

import torch

from conftest import add_bad_files, free_port, make_jpeg_folder
from fast_ressl import evaluate as E
from fast_ressl.config import load_config
from fast_ressl.datasets import DENYLIST_NAME, FileDataset, read_denylist, scan_command
from test_reliability import MODEL, _run, _torchrun


def _data(tmp_path, bad_train: bool = False, bad_val: bool = False):
    """train: 3 classes x 8 JPEGs; val: 3 classes x 5. Bad files (3 per set) go to class_2, the last
    class: rank 1's block when 2 ranks share a scan."""
    train, val = tmp_path / "data" / "train", tmp_path / "data" / "val"
    make_jpeg_folder(train, classes=3, per_class=8, size=(40, 36), seed=0)
    make_jpeg_folder(val, classes=3, per_class=5, size=(40, 36), seed=1)
    if bad_train:
        add_bad_files(train / "class_2")
    if bad_val:
        add_bad_files(val / "class_2")
    return train, val


def _overrides(train, val, run, **extra):
    # Global batch 8 over 24 images: 3 steps per epoch on 1 rank (3 per rank on 2 ranks too).
    items = {"data.source": "folder", "data.root": train, "data.val_root": val, "data.loader": "torch",
             "data.num_threads": 1, "data.weak": "{size: 32}", "data.strong": "[{size: 32}]",
             "data.eval_resize": 32, "data.dtype": "fp32", "data.max_bad_fraction": 0.2,
             "train.batch_size": 8, "train.epochs": 1, "train.precision": "fp32",
             "method.queue_size": 64, "eval.knn_every_epochs": 1, "eval.knn_k": 5, "run.dir": run}
    items.update(extra)
    return [*MODEL, *(f"{k}={v}" for k, v in items.items())]


def _knn_records(run):
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "knn_top1" in r]


def test_two_ranks_shard_the_extraction_and_match_one_process(tmp_path):
    """2 gloo ranks: each rank decodes and forwards only its block of the 21-image kNN train subset
    and of the 15 good val images (uneven blocks: padded for the gather), and the kNN top-1/top-5
    (trained and random-init backbone) equal `fast-ressl knn` on the run's checkpoint in one process
    with the same subset. The val set's bad files are found by the ranks' shared scan."""
    train, val = _data(tmp_path, bad_val=True)
    run = tmp_path / "run"
    out = _run(_torchrun(2, *_overrides(train, val, run, **{"eval.knn_train_samples": 21,
                                                            "eval.knn_compare_random": "true"})),
               timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "x 2 rank(s)" in out.stdout
    [record] = _knn_records(run)
    # rank r takes [n*r//2, n*(r+1)//2): train subset 21 -> 10 + 11, good val images 15 -> 7 + 8
    assert record["knn_images_per_rank"] == [10 + 7, 11 + 8]
    monitor = json.loads((run / "knn.json").read_text())

    ref = E.knn_command(str(run), k=5, train_samples=21, compare_random=True, device="cpu",
                        out=str(tmp_path / "one_process.json"))
    assert (ref["train_samples"], ref["val_samples"]) == (21, 15)
    for key in ("pretrained", "random_init", "raw_pixels"):  # raw pixels: the same gather path
        assert monitor[key] == ref[key], key
    assert (record["knn_top1"], record["knn_top5"]) == (ref["pretrained"]["top1"], ref["pretrained"]["top5"])

    num_files, bad = read_denylist(str(val / DENYLIST_NAME))  # written by rank 0 from both shards
    assert num_files == 18 and sorted(bad) == sorted(str(p) for p in (val / "class_2").glob("bad_*"))


def _features_on_rank(rank: int, port: int, overrides, out_dir: str) -> None:
    """One of 2 gloo ranks (torch.multiprocessing): the monitor's data and gathered features of a
    backbone whose BN running means differ on rank 1 (as DDP's per-rank statistics do)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from fast_ressl import dist

    env = dist.init("cpu", timeout_s=120)
    try:
        cfg = load_config(None, overrides)
        data = E._monitor_data(cfg, env, loader=None)  # no training loader: the shared scan lists it
        backbone = E.build_backbone(cfg, seed=0)
        if rank == 1:
            for m in backbone.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean += 0.5
        own = [b.clone() for b in backbone.buffers()]
        tf, tl, vf, vl, per_rank = E._monitor_features(backbone, data, env)
        restored = all(torch.equal(a, b) for a, b in zip(own, backbone.buffers()))
        one = FileDataset([os.path.join(cfg.data.root, "class_0", "img_000.JPEG")], [0], ["class_0"])
        # 1 image over 2 ranks: rank 0's block is empty (None), rank 1's has the image
        with E._rank0_buffers(backbone, env):
            one_f, one_y, one_counts = E.gather_features(backbone, E._block_batches(cfg, one, env), env)
        torch.save({"train": (tf, tl), "val": (vf, vl), "per_rank": per_rank, "restored": restored,
                    "one": (one_f, one_y, one_counts)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.shutdown()


def test_gathered_features_equal_one_process_features(tmp_path):
    """The features every rank ends up with equal one process's (same order, 1e-5), though each
    rank extracted only its block and rank 1's own BN statistics differ: all blocks are extracted with
    rank 0's, and each rank's own are back afterwards. Both sets have bad files, which the ranks'
    shared scan drops (no training loader here: the train root is scanned like the val root). A set
    of 1 image leaves rank 0's block empty; the gather still gives the image on both ranks."""
    train, val = _data(tmp_path, bad_train=True, bad_val=True)
    overrides = _overrides(train, val, tmp_path / "run", **{"eval.knn_train_samples": 21})
    port = free_port()  # a free port for the rendezvous on loopback
    torch.multiprocessing.spawn(_features_on_rank, args=(port, overrides, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    cfg = load_config(None, overrides)
    backbone, cpu = E.build_backbone(cfg, seed=0), torch.device("cpu")
    for key, ds in (("train", E._dataset(cfg, str(train), 21)), ("val", E._dataset(cfg, str(val)))):
        want_f, want_y = E.extract_features(backbone, E.eval_batches(cfg, ds, cpu), cpu)
        for r in ranks:
            got_f, got_y = r[key]
            assert torch.equal(got_y, want_y), key
            torch.testing.assert_close(got_f, want_f, rtol=1e-5, atol=1e-5)
    assert ranks[0]["per_rank"] == ranks[1]["per_rank"] == [10 + 7, 11 + 8]
    assert ranks[0]["restored"] and ranks[1]["restored"]
    for root in (train, val):  # rank 0 wrote what both ranks' blocks found
        bad = read_denylist(str(root / DENYLIST_NAME))[1]
        assert sorted(bad) == sorted(str(p) for p in (root / "class_2").glob("bad_*"))
    one = FileDataset([str(train / "class_0" / "img_000.JPEG")], [0], ["class_0"])
    want_f, _ = E.extract_features(backbone, E.eval_batches(cfg, one, cpu), cpu)
    for r in ranks:
        one_f, one_y, one_counts = r["one"]
        assert one_counts == [0, 1] and one_y.tolist() == [0]
        torch.testing.assert_close(one_f, want_f, rtol=1e-5, atol=1e-5)


def test_custom_denylist_is_reused_not_rescanned(tmp_path, monkeypatch):
    """With `data.denylist` set, the monitor takes the training loader's file list (bad files
    dropped by that denylist): no scan of the training set happens, so no denylist of it is written
    anywhere and the custom one is left as it was; the val set gets its own denylist once. The
    offline `fast-ressl knn` on the run reads the custom denylist as well."""
    train, val = _data(tmp_path, bad_train=True)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # where an unwritable root's denylist would go
    custom = tmp_path / "custom_denylist.json"
    assert scan_command(str(train), output=str(custom), progress=False) == 3
    before = (custom.stat().st_mtime_ns, custom.read_bytes())
    run = tmp_path / "run"
    cfg = load_config(None, _overrides(train, val, run, **{"data.denylist": custom, "train.epochs": 2,
                                                           "eval.knn_train_samples": 0}))
    from fast_ressl.train import train as run_training

    run_training(cfg, live=False)
    assert not (train / DENYLIST_NAME).exists(), "the monitor rescanned the training set"
    # (only fast_ressl's part of the cache: matplotlib, drawing the run's curves, keeps its font cache there)
    assert not (cache / "fast_ressl").exists(), "the monitor rescanned the training set (denylist in the cache)"
    assert (custom.stat().st_mtime_ns, custom.read_bytes()) == before
    records = _knn_records(run)
    assert [r["epoch"] for r in records] == [0, 1]
    # all 24 good training images (the 3 listed in the custom denylist left out) + 15 val images
    assert [r["knn_images_per_rank"] for r in records] == [[24 + 15]] * 2
    assert os.path.exists(val / DENYLIST_NAME)
    E.knn_command(str(run), k=5, device="cpu")  # the offline kNN reads the custom denylist too
    assert not (train / DENYLIST_NAME).exists() and not (cache / "fast_ressl").exists()
    assert json.loads((run / "knn.json").read_text())["train_samples"] == 24


def test_a_stop_at_an_epoch_boundary_runs_that_epochs_knn_check_on_resume(tmp_path, monkeypatch):
    """A stop signal seen at an epoch's last step: the checkpoint is written before that epoch's kNN
    check, and the run exits without it. Resumed, the run starts after that step: the check used to
    be skipped for good, and on the run's last step the run stayed "preempted" with no knn.json.
    Now the resume runs it first; at the last step it then finishes the run as completed. (The
    signal is the stop decision itself, made true at step 6: a real signal cannot be timed to a
    step.)"""
    from fast_ressl import dist
    from fast_ressl import train as T

    train, val = _data(tmp_path)
    run = tmp_path / "run"
    cfg = load_config(None, _overrides(train, val, run, **{"train.epochs": 2,  # 3 steps/epoch, 6 steps
                                                           "eval.knn_compare_random": "true"}))
    steps = []
    real_any_flag = dist.any_flag

    def flag_at_the_end(flag, env):  # the loop's stop decision, once per step
        steps.append(None)
        return real_any_flag(flag, env) or len(steps) == 6

    monkeypatch.setattr(dist, "any_flag", flag_at_the_end)
    try:
        T.train(cfg, live=False)
        raise AssertionError("no stop")
    except T.Preempted:
        pass
    monkeypatch.undo()
    assert json.loads((run / "summary.json").read_text())["status"] == "preempted"
    assert [r["epoch"] for r in _knn_records(run)] == [0] and not (run / "knn.json").exists()
    summary = T.train(cfg, live=False)
    assert summary["status"] == "completed" and summary["step"] == 6
    assert [r["epoch"] for r in _knn_records(run)] == [0, 1] and (run / "knn.json").exists()
