"""DALI pipelines on CPU (device_id=None) over tiny generated JPEG folders: contract, augmentations,
sharding, resume, bad files, eval."""
from __future__ import annotations

import io
import math
import os

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from conftest import assert_same_batches, make_jpeg_folder, start_together, tiny_overrides  # noqa: E402
from fast_ressl.config import load_config  # noqa: E402
from fast_ressl.datasets import DataError, list_folder, read_denylist  # noqa: E402
from pipelines_dali.loader import DaliEvalLoader, DaliTrainLoader, parse_ascii_labels  # noqa: E402

CPU = torch.device("cpu")
OFF = {"data.augment.jitter_p": 0.0, "data.augment.grayscale_p": 0.0, "data.augment.blur_p": 0.0,
       "data.augment.flip_p": 0.0}


def _cfg(root, **extra):
    return load_config(None, tiny_overrides(root, **extra))


def _loader(root, rank=0, world=1, debug=False, build_ahead=True, **extra):
    return DaliTrainLoader(_cfg(root, **extra), rank, world, CPU, debug=debug, progress=False,
                           build_ahead=build_ahead)


def _unnormalise(x: torch.Tensor, cfg) -> torch.Tensor:
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    return x.float() * std + mean


def _is_gray(x01: torch.Tensor, tol: float = 0.02) -> torch.Tensor:
    """(N,) bool: R, G and B equal everywhere (up to fp16 rounding) in a [0, 1] image batch."""
    d = (x01[:, 0] - x01[:, 1]).abs().amax((1, 2)) + (x01[:, 1] - x01[:, 2]).abs().amax((1, 2))
    return d < tol


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_batch_contract_shapes_dtype_layout_range(jpeg_folder, dtype):
    L = _loader(jpeg_folder, **{"data.dtype": dtype,
                                "data.strong": "[{size: 32}, {size: 16, scale_min: 0.1, scale_max: 0.5}]"})
    assert L.steps_per_epoch == 48 // 8 and L.bad_files == []
    b = next(iter(L))
    want = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for x, size in [(b.x_weak, 32), (b.x_strong[0], 32), (b.x_strong[1], 16)]:
        assert x.shape == (8, 3, size, size) and x.dtype == want and x.device.type == "cpu"
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert x.stride() == (size * size * 3, 1, size * 3, 3)
        x01 = _unnormalise(x, L.cfg)
        assert x01.min() >= -0.02 and x01.max() <= 1.02
        assert x01.std() > 0.05  # real image content, not a constant
    assert b.labels.dtype == torch.int64 and b.labels.shape == (8,)
    assert 0 <= b.labels.min() and b.labels.max() <= 2


def test_fp16_output_is_a_view_of_dali_nhwc_memory(jpeg_folder):
    L = _loader(jpeg_folder)
    b = next(iter(L))
    nhwc = b.x_weak.permute(0, 2, 3, 1)
    assert nhwc.is_contiguous()  # the NCHW tensor is a permuted view of a dense NHWC buffer


def test_views_of_one_image_differ_in_crop(jpeg_folder):
    L = _loader(jpeg_folder, **OFF)  # no colour ops, no flips: only the crops can differ
    b = next(iter(L))
    diff = (b.x_weak.float() - b.x_strong[0].float()).abs().flatten(1).amax(1)
    assert (diff > 0.1).all()


def test_labels_follow_the_files(jpeg_folder):
    L = _loader(jpeg_folder)
    files, labels = L.epoch_files(0)
    got = torch.cat([next(L).labels for _ in range(L.steps_per_epoch)])
    assert got.tolist() == labels
    want = {f: lab for f, lab in zip(L.dataset.files, L.dataset.labels)}
    assert all(want[f] == lab for f, lab in zip(files, labels))
    assert all(os.path.basename(os.path.dirname(f)) == f"class_{lab}" for f, lab in zip(files, labels))


# ----------------------------------------------------------------------------- augmentations
def test_weak_view_never_jittered_or_gray(jpeg_folder):
    on = _loader(jpeg_folder, **{"data.augment.jitter_p": 1.0, "data.augment.grayscale_p": 1.0,
                                 "data.augment.blur_p": 1.0, "data.augment.solarize_p": 1.0})
    off = _loader(jpeg_folder, **{"data.augment.jitter_p": 0.0, "data.augment.grayscale_p": 0.0,
                                  "data.augment.blur_p": 0.0})
    for _ in range(3):
        a, b = next(on), next(off)
        assert torch.equal(a.x_weak, b.x_weak)  # the strong view's colour ops never touch it
        assert not _is_gray(_unnormalise(a.x_weak, on.cfg)).any()
        assert _is_gray(_unnormalise(a.x_strong[0], on.cfg)).all()
        assert not torch.equal(a.x_strong[0], b.x_strong[0])


def _strong(root, n_batches=3, **aug):
    L = _loader(root, **{**OFF, **{f"data.augment.{k}": v for k, v in aug.items()}})
    return torch.cat([next(L).x_strong[0].float() for _ in range(n_batches)])


def test_each_strong_op_in_isolation(jpeg_folder):
    base = _strong(jpeg_folder)
    # the crop op's seed does not depend on the later ops, so the crops are identical
    blurred = _strong(jpeg_folder, blur_p=1.0, blur_sigma_min=1.5, blur_sigma_max=2.0)

    def roughness(x):
        return (x[..., 1:] - x[..., :-1]).abs().mean()

    assert roughness(blurred) < 0.7 * roughness(base)
    jittered = _strong(jpeg_folder, jitter_p=1.0)
    assert (jittered - base).abs().flatten(1).amax(1).min() > 0.02
    gray = _strong(jpeg_folder, grayscale_p=1.0)
    cfg = _cfg(jpeg_folder)
    assert _is_gray(_unnormalise(gray, cfg)).all() and not _is_gray(_unnormalise(base, cfg)).any()
    # solarize with threshold 0: every pixel inverted -> x01 -> 1 - x01
    sol = _strong(jpeg_folder, n_batches=1, solarize_p=1.0, solarize_threshold=0.0)
    assert torch.allclose(_unnormalise(sol, cfg), 1 - _unnormalise(base[:8], cfg), atol=0.02)


def test_strong_rates_match_probabilities(jpeg_folder):
    L = _loader(jpeg_folder, debug=True)  # default recipe: jitter 0.8, gray 0.2, blur 0.5, flip 0.5
    dec = {k: [] for k in ("jitter", "gray", "blur", "flip")}
    gray_px = []
    for _ in range(4 * L.steps_per_epoch):  # 4 epochs x 48 images = 192 samples
        b = next(L)
        for k in dec:
            dec[k].append(L.last_debug[k])
        gray_px.append(_is_gray(_unnormalise(b.x_strong[0], L.cfg)))
    n = 4 * 48
    a = L.cfg.data.augment
    for k, p in [("jitter", a.jitter_p), ("gray", a.grayscale_p), ("blur", a.blur_p), ("flip", a.flip_p)]:
        rate = torch.cat(dec[k]).mean().item()
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (k, rate, p)
    # the decision is what happened to the pixels: gray exactly where decided
    assert torch.equal(torch.cat(gray_px), torch.cat(dec["gray"]).bool())


# ----------------------------------------------------------------------------- sharding, epochs
def test_two_shards_disjoint_cover_and_equal_batches(jpeg_folder):
    ranks = [_loader(jpeg_folder, rank=r, world=2) for r in range(2)]  # global batch 8 -> 4 per rank
    assert ranks[0].batch_size == 4 and ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 6
    for epoch in range(2):
        shard = [set(L.epoch_files(epoch)[0]) for L in ranks]
        assert not shard[0] & shard[1]
        assert shard[0] | shard[1] == set(ranks[0].dataset.files)
    # actually read one epoch on each rank: 6 batches, labels in shard order
    for L in ranks:
        got = torch.cat([next(L).labels for _ in range(L.steps_per_epoch)])
        assert got.tolist() == L.epoch_files(0)[1]
        assert L.epoch == 0 and L.state_dict()["epoch"] == 1


def test_every_epoch_is_reshuffled_and_drops_the_partial_batch(tmp_path):
    root = tmp_path / "odd_count"
    make_jpeg_folder(root, classes=2, per_class=11)  # 22 images, global batch 8 -> 2 steps, 6 dropped
    L = _loader(root)
    assert L.steps_per_epoch == 2
    e0, e1 = L.epoch_files(0)[0], L.epoch_files(1)[0]
    assert len(e0) == 16 and e0 != e1
    labels = [next(L).labels for _ in range(2 * L.steps_per_epoch)]
    assert torch.cat(labels[2:]).tolist() == L.epoch_files(1)[1] and L.epoch == 1


# ----------------------------------------------------------------------------- resume
# mid-epoch; while epoch 2's pipeline is being built ahead (6 batches per epoch, prefetch depth 2);
# at the epoch boundary; into epoch 2
@pytest.mark.parametrize("stop_after", [2, 5, 6, 7])
def test_restore_gives_identical_next_batches(jpeg_folder, stop_after):
    ref = _loader(jpeg_folder)
    for _ in range(stop_after):
        next(ref)
    buf = io.BytesIO()
    torch.save({"loader": ref.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["loader"]
    want = [next(ref) for _ in range(3)]
    resumed = _loader(jpeg_folder)
    resumed.load_state_dict(state)
    assert_same_batches(want, [next(resumed) for _ in range(3)])


def test_next_epoch_pipeline_is_built_ahead_not_in_its_first_next(jpeg_folder, monkeypatch):
    """The first batch of an epoch comes from a pipeline built on a background thread while the
    previous epoch's last batches were handed out: next() itself builds nothing (a build there costs
    decoder set-up and, on a GPU, device and pinned allocations). The batches are bit-identical to
    those of pipelines built on the boundary."""
    import threading

    built_on = {}  # loader -> [(epoch, built on the main thread?)]
    real_make = DaliTrainLoader._make

    def make(self, epoch, checkpoint, prepare_first_batch, start=None):
        built_on.setdefault(id(self), []).append((epoch, threading.current_thread() is threading.main_thread()))
        return real_make(self, epoch, checkpoint, prepare_first_batch, start)

    monkeypatch.setattr(DaliTrainLoader, "_make", make)
    ahead, plain = _loader(jpeg_folder), _loader(jpeg_folder, build_ahead=False)
    spe = ahead.steps_per_epoch
    assert spe == 6 and ahead.ahead_batches == 2
    want = [next(plain) for _ in range(3 * spe)]
    got = [next(ahead) for _ in range(spe - 3)]
    assert ahead.builds == [("sync", 0)]
    got.append(next(ahead))  # the 2 batches left are already scheduled in epoch 0's pipeline
    assert ahead.builds == [("sync", 0), ("ahead", 1)]
    got += [next(ahead) for _ in range(2)]  # the rest of epoch 0
    monkeypatch.setattr(DaliTrainLoader, "_build", lambda *a: pytest.fail("a pipeline was built inside next()"))
    got += [next(ahead) for _ in range(2 * spe)]  # epochs 1 and 2: swapped in
    assert ahead.builds == [("sync", 0), ("ahead", 1), ("ahead", 2), ("ahead", 3)]
    assert built_on[id(ahead)][0] == (0, True)  # start-up: the first next() builds epoch 0
    ahead._ahead.get()  # epoch 3's build, started during epoch 2's last batches
    assert sorted(built_on[id(ahead)][1:]) == [(1, False), (2, False), (3, False)]
    assert built_on[id(plain)] == [(0, True), (1, True), (2, True)]
    assert_same_batches(want, got)


def test_no_pipeline_is_built_ahead_for_an_epoch_the_run_never_reaches(jpeg_folder):
    """end_at(step), which the trainer calls with its last step: a run that ends with its last epoch,
    or a batch before it (train.stop_at_step), starts no build of the next one; a caller that goes on
    anyway gets its batches from a pipeline built on the boundary."""
    L = _loader(jpeg_folder)
    spe = L.steps_per_epoch
    assert spe == 6 and L.ahead_batches == 2
    L.end_at(2 * spe - 1)  # the last batch read is epoch 1's 5th, inside the 2 that start a build
    for _ in range(2 * spe - 1):
        next(L)
    assert L.builds == [("sync", 0), ("ahead", 1)]
    next(L)
    b = next(L)  # past the end: epoch 2, built here
    assert L.builds == [("sync", 0), ("ahead", 1), ("sync", 2)] and b.x_weak.shape[0] == 8


def test_ahead_build_error_surfaces_on_the_epochs_first_batch(jpeg_folder, monkeypatch):
    """An epoch whose pipeline cannot be built: the ahead build fails, then the build on the
    boundary, whose error is the run's."""
    L = _loader(jpeg_folder)
    real_make = DaliTrainLoader._make

    def make(self, epoch, checkpoint, prepare_first_batch, start=None):
        if epoch == 1:
            raise RuntimeError("decoder failed for epoch 1")
        return real_make(self, epoch, checkpoint, prepare_first_batch, start)

    monkeypatch.setattr(DaliTrainLoader, "_make", make)
    for _ in range(L.steps_per_epoch):
        next(L)  # epoch 0 is unaffected by its successor's failing build
    with pytest.raises(RuntimeError, match="decoder failed for epoch 1"):
        next(L)


def test_a_failed_ahead_build_is_built_again_on_the_boundary(jpeg_folder, monkeypatch, capsys):
    """Only the build ahead fails (on a GPU, say, out of memory while the old pipeline still holds
    its buffers): the epoch is built on the boundary instead, with the same batches, and a warning
    says so (a failed ahead build ended the run before)."""
    want = _loader(jpeg_folder)
    want_batches = [next(want) for _ in range(2 * want.steps_per_epoch)]
    L = _loader(jpeg_folder)
    real_make = DaliTrainLoader._make

    def make(self, epoch, checkpoint, prepare_first_batch, start=None):
        if prepare_first_batch:  # the ahead thread's build
            raise RuntimeError("out of memory (test)")
        return real_make(self, epoch, checkpoint, prepare_first_batch, start)

    monkeypatch.setattr(DaliTrainLoader, "_make", make)
    got = [next(L) for _ in range(2 * L.steps_per_epoch)]
    assert_same_batches(got, want_batches)
    assert ("ahead", 1) in L.builds and ("sync", 1) in L.builds
    assert "building epoch 1's pipeline ahead failed (RuntimeError: out of memory (test)); building it now" \
        in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad files
def test_bad_files_skipped_and_listed_odd_files_kept(messy_folder):
    root, odd, bad = messy_folder
    L = _loader(root)
    assert sorted(L.bad_files) == sorted(bad.values())
    assert set(odd.values()) <= set(L.dataset.files) and len(L.dataset) == 48 + 4
    assert "truncated" in L.bad_reasons[bad["truncated"]] and "zero-byte" in L.bad_reasons[bad["empty"]]
    num, denied = read_denylist(os.path.join(root, ".fast_ressl_denylist.json"))
    assert num == 48 + 4 + 3 and sorted(denied) == sorted(bad.values())
    for _ in range(L.steps_per_epoch * 2):  # every good file decodes in DALI, odd ones included
        b = next(L)
        assert torch.isfinite(b.x_weak.float()).all()


# What this test is for: colour space and orientation. A CMYK file read without Adobe's inversion
# is off by ~100 levels of 255, a grey one left with one channel or an ignored EXIF rotation fails
# the shape check. DALI's CPU decoder matches PIL exactly on these files (0.0). The GPU's decoders
# upsample 4:2:0 chroma by nearest neighbour unless asked (jpeg_fancy_upsampling, off by default, is
# asked here); libjpeg-turbo's non-fancy upsampling is 4.5 levels from PIL on the EXIF file
# (measured in review), so the GPU bound is 8 in case the option does not reach every decoder.
@pytest.mark.parametrize("device,tolerance", [("cpu", 2.0), pytest.param("mixed", 8.0, marks=pytest.mark.gpu)])
def test_odd_files_decode_to_rgb_like_pil(messy_folder, device, tolerance):
    from nvidia.dali import fn, pipeline_def, types

    from fast_ressl.datasets import pil_rgb

    _, odd, _ = messy_folder
    files = list(odd.values())

    @pipeline_def(batch_size=len(files), num_threads=1, device_id=None if device == "cpu" else 0)
    def decode():
        enc, _ = fn.readers.file(files=files)
        fancy = {"jpeg_fancy_upsampling": True} if device == "mixed" else {}
        return fn.decoders.image(enc, device=device, output_type=types.RGB, **fancy)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    out = out if device == "cpu" else out.as_cpu()
    for i, (kind, path) in enumerate(odd.items()):
        got, want = np.array(out[i]), np.asarray(pil_rgb(path))
        assert got.shape == want.shape and got.shape[2] == 3, kind
        assert np.abs(got.astype(int) - want).mean() < tolerance, kind
    assert np.array(out[files.index(odd["exif"])]).shape[:2] == (48, 32)  # rotated by EXIF


def test_existing_denylist_is_used_without_rescanning(messy_folder, monkeypatch):
    root, _, bad = messy_folder
    _loader(root)  # scans and writes the denylist
    import fast_ressl.datasets as datasets

    monkeypatch.setattr(datasets, "scan_files", lambda *a, **k: pytest.fail("rescanned"))
    assert sorted(_loader(root).bad_files) == sorted(bad.values())


def test_class_with_nothing_decodable_stops_naming_the_folder(tmp_path):
    root = tmp_path / "d"
    make_jpeg_folder(root, classes=2, per_class=8)
    from conftest import add_bad_files

    add_bad_files(root / "class_9")
    with pytest.raises(DataError, match="class_9"):
        _loader(root, **{"data.max_bad_fraction": 0.5})


def test_bad_share_over_limit_stops(messy_folder):
    root, _, _ = messy_folder
    with pytest.raises(DataError, match="max_bad_fraction"):
        _loader(root, **{"data.max_bad_fraction": 0.01})


def test_unreadable_folder_stops_naming_it(jpeg_folder, monkeypatch):
    target = str(jpeg_folder / "class_1")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == target:
            raise PermissionError(13, "Permission denied", target)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError, match="class_1"):
        list_folder(jpeg_folder)


# ----------------------------------------------------------------------------- eval, helpers
def test_eval_loader_sees_every_file_once_center_crop(jpeg_folder):
    cfg = _cfg(jpeg_folder, **{"data.eval_resize": 40})
    E = DaliEvalLoader(cfg, str(jpeg_folder), CPU, batch_size=20, progress=False)
    xs, ys = zip(*list(E))
    assert [x.shape[0] for x in xs] == [20, 20, 8] and len(E) == 3
    x = torch.cat(xs)
    assert x.shape == (48, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.cat(ys).tolist() == E.dataset.labels
    again = torch.cat([x for x, _ in E])
    assert torch.equal(x, again)  # deterministic


@pytest.mark.parametrize("where", ["class_1/odd_bilevel.tif", "class_0/a_bilevel.tif"],
                         ids=["second_batch", "first_batch"])
def test_eval_pass_leaves_out_a_file_only_pil_decodes(jpeg_folder, capsys, where):
    """A bilevel TIFF in the eval folder passes the scan (PIL decodes it) but fails DALI's TIFF
    parser: the pass used to raise, and through the online kNN monitor end the training run at each
    epoch's end. Now the file is found, reported once, left out of this pass and the next, and
    every other image comes through with its label. In the pass's first batch too: the iterator
    used to run that batch in its constructor, outside the pass's handler (found in review)."""
    from PIL import Image

    tif = jpeg_folder / where
    Image.open(jpeg_folder / "class_1" / "img_004.JPEG").convert("1").save(tif, format="TIFF")
    cfg = _cfg(jpeg_folder, **{"data.eval_resize": 40})
    E = DaliEvalLoader(cfg, str(jpeg_folder), CPU, batch_size=20, progress=False)
    assert str(tif) in E.dataset.files and E.bad_files == []  # the scan passed it
    want = [y for f, y in zip(E.dataset.files, E.dataset.labels) if f != str(tif)]
    capsys.readouterr()
    xs, ys = zip(*list(E))
    assert torch.cat(xs).shape[0] == 48 and torch.cat(ys).tolist() == want
    assert E.bad_files == [str(tif)] and capsys.readouterr().err.count("failed to decode in the eval pass") == 1
    assert torch.cat([y for _, y in E]).tolist() == want and "failed to decode" not in capsys.readouterr().err


def test_a_decode_check_that_cannot_run_blames_no_file(jpeg_folder):
    """The halving search over a failed batch's files asks DALI's decoder in child processes. A
    child that cannot decode anything (here: asked for GPU 999, which no machine has; on a cluster:
    no CUDA context for a second process, out of memory) used to read as "DALI cannot decode it",
    down to every single file of the window, after 2N-2 children. Now a control JPEG is asked first
    and the search raises, naming the cause, with no file blamed; on a decoder that works, the same
    window gives only the file that is at fault."""
    from PIL import Image

    from pipelines_dali import loader

    data = _cfg(jpeg_folder).data
    files = sorted(str(f) for f in (jpeg_folder / "class_0").iterdir())[:4]
    with pytest.raises(loader.DecodeCheckUnavailable, match="could not be set up"):
        loader.undecodable(files, data, device_id=999)
    tif = jpeg_folder / "class_0" / "odd_bilevel.tif"
    Image.open(files[0]).convert("1").save(tif, format="TIFF")
    found = loader.undecodable(files + [str(tif)], data, device_id=None)
    assert list(found) == [str(tif)] and found[str(tif)].startswith("DALI cannot decode it")


def test_a_decode_check_stopped_from_outside_blames_no_file(jpeg_folder):
    """The decode check's child runs in a session of its own (torchrun stops its workers by a signal
    to their process group, Ctrl-C signals the terminal's: the child used to get it too), and a child
    stopped by SIGTERM/SIGINT/SIGHUP/SIGKILL is no answer: it used to read as "DALI's decoder
    crashed", blaming good files (found in review). Here the child is sent SIGTERM mid-check."""
    import signal
    import threading
    import time

    from pipelines_dali import loader

    data = _cfg(jpeg_folder).data
    files = sorted(str(f) for f in jpeg_folder.rglob("*.JPEG"))
    for _ in range(5):  # the child lives ~0.5 s (Python, DALI's import, 48 small JPEGs): rarely missed
        result = {}

        def ask():
            try:
                result["answer"] = loader._dali_error(files, data, None)
            except loader.DecodeCheckUnavailable as err:
                result["error"] = str(err)

        t = threading.Thread(target=ask)
        t.start()
        child, deadline = None, time.time() + 10
        while child is None and t.is_alive() and time.time() < deadline:
            for d in Path("/proc").iterdir():
                try:
                    if d.name.isdigit() and b"pipelines_dali.decode_check" in (d / "cmdline").read_bytes() \
                            and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        child = int(d.name)
                except (OSError, ValueError, IndexError):
                    continue
            time.sleep(0.005)
        if child is not None:
            assert os.getsid(child) == child and os.getsid(child) != os.getsid(0)
            os.kill(child, signal.SIGTERM)
        t.join(60)
        if child is not None and "error" in result:
            assert "stopped by SIGTERM" in result["error"]
            return
    pytest.fail(f"no decode-check child was caught in 5 tries: {result}")


def test_parse_ascii_labels():
    raw = torch.tensor([list(b"17\n         "), list(b"0           "), list(b"  205       ")],
                       dtype=torch.uint8)
    assert parse_ascii_labels(raw).tolist() == [17, 0, 205]


# ----------------------------------------------------------------------------- webdataset
def _write_shards(src_files, labels, out, per_shard, extra=()):
    import tarfile

    out.mkdir()
    items = [(f, lab) for f, lab in zip(src_files, labels)] + list(extra)
    for s in range(0, len(items), per_shard):
        with tarfile.open(out / f"shard-{s // per_shard:03d}.tar", "w") as tf:
            for i, (f, lab) in enumerate(items[s:s + per_shard], start=s):
                tf.add(f, arcname=f"{i:06d}.jpg")
                data = f"{lab}\n".encode()
                info = tarfile.TarInfo(f"{i:06d}.cls")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def test_webdataset_shards_index_labels_and_bad_samples(messy_folder, tmp_path):
    root, _, bad = messy_folder
    ds = list_folder(root)
    good = [(f, lab) for f, lab in zip(ds.files, ds.labels) if f not in bad.values()]
    files, labels = zip(*good)
    _write_shards(files, labels, tmp_path / "wds", per_shard=20, extra=[(bad["truncated"], 1)])
    L = _loader(tmp_path / "wds", **{"data.source": "webdataset", "data.shuffle_buffer": 16})
    assert L.num_samples == len(files) and L.steps_per_epoch == len(files) // 8
    assert L.bad_files == [f"shard-002.tar:{len(files):06d}"]  # the truncated image, left out
    assert (tmp_path / "wds" / "shard-000.idx").read_text().startswith("v1.2 20\n")
    seen = torch.cat([next(L).labels for _ in range(L.steps_per_epoch)])
    assert seen.min() >= 0 and seen.max() <= 2 and len(set(seen.tolist())) == 3
    b = next(L)
    assert b.x_weak.shape == (8, 3, 32, 32) and b.x_weak.is_contiguous(memory_format=torch.channels_last)
    state = L.state_dict()
    want = next(L)
    R = _loader(tmp_path / "wds", **{"data.source": "webdataset", "data.shuffle_buffer": 16})
    R.load_state_dict(state)
    got = next(R)
    assert torch.equal(want.x_strong[0], got.x_strong[0]) and torch.equal(want.labels, got.labels)


def test_webdataset_index_files_written_once_by_ranks_that_start_together(jpeg_folder, tmp_path):
    """Every rank of a job on shards without index files wrote them, all through one temporary name
    per shard: a rank's rename took another's file away mid-write (FileNotFoundError, 1 of 3
    processes on 100 shards here). Now they take turns: one writes, the others read."""
    import json

    ds = list_folder(jpeg_folder)
    _write_shards(ds.files, ds.labels, tmp_path / "wds", per_shard=1)
    code = ("from pipelines_dali.webdataset import list_shards\n# --- start\n"
            f"_, _, n, bad = list_shards({str(tmp_path / 'wds')!r}, num_threads=1)\nprint(n, len(bad))\n")
    runs = start_together(tmp_path, code, [{}] * 4)
    assert [rc for rc, _, _ in runs] == [0] * 4, runs
    assert [out.split() for _, out, _ in runs] == [[str(len(ds.files)), "0"]] * 4, runs
    assert sum(err.count("writing webdataset index files") for _, _, err in runs) == 1, runs
    assert not list((tmp_path / "wds").glob("*.tmp"))
    assert json.loads((tmp_path / "wds" / ".fast_ressl_wds_denylist.json").read_text())["num_samples"] == 48


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_messy_folder_trains_to_the_end_and_reports_exactly_the_bad_files(messy_folder, tmp_path, loader,
                                                                          monkeypatch):
    import json

    from fast_ressl import train as T

    kept = []
    real = T.build_loader
    monkeypatch.setattr(T, "build_loader", lambda *a: kept.append(real(*a)) or kept[-1])
    root, odd, bad = messy_folder
    cfg = load_config(None, tiny_overrides(root, **{
        "data.loader": loader, "model.backbone": "test_resnet", "model.proj_hidden_dim": 32,
        "model.proj_dim": 16, "method.compile_loss": "false", "train.epochs": 2,
        "train.log_every": 1, "optim.warmup_epochs": 0.5, "run.dir": str(tmp_path / "run")}))
    summary = T.train(cfg, live=False)
    assert summary["status"] == "completed" and summary["step"] == 2 * (52 // 8)
    if loader == "dali":  # the trainer told the loader where the run ends: no epoch 3 built ahead
        assert kept[0].builds == [("sync", 0), ("ahead", 1)]
    assert sorted(summary["bad_files"]) == sorted(bad.values())
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(on_disk["bad_files"]) == sorted(bad.values())
    assert not set(odd.values()) & set(on_disk["bad_files"])


def test_multicrop_recipe_gives_five_student_views(jpeg_folder):
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "imagenet_resnet50_5crop.yaml",
                      tiny_overrides(jpeg_folder)[:1] + [f"data.root={jpeg_folder}", "train.batch_size=8",
                                                         "method.queue_size=64", "data.num_threads=2"])
    assert [v.size for v in cfg.data.strong] == [224, 192, 160, 128, 96]
    # scaled down 7x to keep the test fast; the per-view scale ranges are the recipe's
    for v in cfg.data.strong:
        v.size //= 7
    cfg.data.weak.size //= 7
    L = DaliTrainLoader(cfg, 0, 1, CPU, progress=False)
    b = next(L)
    assert b.x_weak.shape[-1] == 32 and [x.shape[-1] for x in b.x_strong] == [32, 27, 22, 18, 13]


# ----------------------------------------------------------------------------- GPU (mixed decode)
def test_gpu_graphs_are_well_formed_without_a_gpu(jpeg_folder):
    """DALI defines a pipeline's graph when the pipeline is constructed, which needs no CUDA (only
    build() does), and checks there every operator's arguments against its schema and every input's
    device (a misspelt argument of the mixed decoder, or a CPU operator fed GPU data, raise). So the
    graphs a GPU run builds (mixed decode, the augmentations on GPU data, labels moved to the GPU)
    are checked on this CPU: train from files (two student views, debug outputs) and webdataset
    (the shard paths are read only at build), and eval. Images and labels must come out on the GPU,
    where the loader's DLPack hand-over expects them."""
    from pipelines_dali.pipeline import eval_pipeline, train_pipeline

    cfg = _cfg(jpeg_folder, **{"data.strong": "[{size: 32}, {size: 24}]"})
    files = list_folder(str(jpeg_folder)).files
    labels = [0] * len(files)
    common = dict(batch_size=4, num_threads=1, device_id=0, seed=1)
    pipes = {
        "files": train_pipeline(cfg.data, "files", gpu=True, debug=True, files=files, labels=labels, **common),
        "webdataset": train_pipeline(cfg.data, "webdataset", gpu=True, wds_paths=["/absent/a.tar"],
                                     wds_index=["/absent/a.idx"], **common),
        "eval": eval_pipeline(cfg.data, files, labels, 32, 36, gpu=True, **common),
    }
    # DALI 2.4 keeps the outputs as defined in Pipeline._graph_out (private: a rename fails here)
    devices = {name: [node.device for node in pipe._graph_out] for name, pipe in pipes.items()}
    # train: weak, 2 strong views, labels (+ the debug decisions, host values read on the CPU)
    assert devices["files"][:4] == ["gpu"] * 4 and set(devices["files"][4:]) == {"cpu"}, devices
    assert devices["webdataset"] == ["gpu"] * 4 and devices["eval"] == ["gpu"] * 2, devices
    # every view from one decode: one image decoder in each graph, on the GPU ("mixed": the file is
    # parsed on the host, decoded on the device); the graph is walked back through regular inputs
    for name, pipe in pipes.items():
        assert _decoders(pipe) == ["mixed"], (name, _decoders(pipe))


def _graph_ops(pipe) -> list:
    """(module, name, device) of every operator in a constructed (not built) DALI pipeline's graph,
    found by walking back from its outputs through regular inputs and named arguments (DALI 2.4's
    private DataNode.source / operator-instance fields)."""
    seen, stack, found = set(), list(pipe._graph_out), []
    while stack:
        op = stack.pop().source
        if op is None or id(op) in seen:
            continue
        seen.add(id(op))
        stack.extend(op.inputs)
        stack.extend(v for v in getattr(op, "_kwargs", {}).values() if hasattr(v, "source"))
        found.append((type(op._op).__module__, type(op._op).__name__, op._op.device))
    return found


def _decoders(pipe) -> list:
    """The devices of the image decoders in a constructed DALI pipeline's graph."""
    return [dev for mod, name, dev in _graph_ops(pipe) if mod == "nvidia.dali.ops.decoders" and name == "Image"]


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu_graph"])
def test_colour_ops_with_probability_zero_are_left_out_of_the_graph(jpeg_folder, gpu):
    """jitter_p=0 and grayscale_p=0 leave the contrast pass and the colour twist out of the graph
    instead of running them as per-sample identities (as bench's `--ablate augment` assumes: it
    measures the loader without the student view's colour and blur ops); jitter alone keeps both."""
    from fast_ressl.bench import ABLATIONS
    from pipelines_dali.pipeline import train_pipeline

    def names(**over):
        cfg = _cfg(jpeg_folder, **over)
        files = list_folder(str(jpeg_folder)).files
        pipe = train_pipeline(cfg.data, "files", gpu=gpu, files=files, labels=[0] * len(files), batch_size=4,
                              num_threads=1, device_id=0 if gpu else None, seed=1)
        return {name for _, name, _ in _graph_ops(pipe)}

    colour = {"ColorTwist", "Mean", "GaussianBlur"}
    assert colour <= names()
    ablated = dict(item.split("=") for item in ABLATIONS["augment"])
    assert not colour & names(**ablated), names(**ablated)
    assert {"ColorTwist", "Mean"} <= names(**{"data.augment.grayscale_p": 0.0})
    gray_only = names(**{"data.augment.jitter_p": 0.0})
    assert "ColorTwist" in gray_only and "Mean" not in gray_only


@pytest.mark.gpu
def test_gpu_mixed_decode_contract_and_resume(messy_folder):
    root, _, bad = messy_folder
    dev = torch.device("cuda", 0)
    cfg = _cfg(root)
    L = DaliTrainLoader(cfg, 0, 1, dev, progress=False)
    assert sorted(L.bad_files) == sorted(bad.values())
    b = next(L)
    for x in (b.x_weak, b.x_strong[0]):
        assert x.device.type == "cuda" and x.dtype == torch.float16
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert b.labels.device.type == "cuda" and b.labels.dtype == torch.int64
    state = L.state_dict()
    want = [next(L) for _ in range(2)]
    R = DaliTrainLoader(cfg, 0, 1, dev, progress=False)
    R.load_state_dict(state)
    for a, c in zip(want, (next(R) for _ in range(2))):
        assert torch.equal(a.x_weak, c.x_weak) and torch.equal(a.labels, c.labels)
    # zero copy: the views stay in DALI's memory (DLPack), so torch's allocator grows by the labels'
    # int64 cast only (one 512-byte block), not by the ~98 KB of fp16 images of a batch
    before = torch.cuda.memory_allocated(dev)
    c = next(R)
    image_bytes = sum(x.numel() * x.element_size() for x in (c.x_weak, *c.x_strong))
    assert torch.cuda.memory_allocated(dev) - before < image_bytes // 4, (before, image_bytes)


@pytest.mark.gpu
def test_gpu_epochs_built_ahead_match_epochs_built_on_the_boundary(jpeg_folder):
    """The ahead build runs DALI's mixed decoder and hands CUDA tensors over from a side thread: the
    batches of 3 epochs equal those of pipelines built on the boundary."""
    dev = torch.device("cuda", 0)
    cfg = _cfg(jpeg_folder)
    ahead = DaliTrainLoader(cfg, 0, 1, dev, progress=False)
    plain = DaliTrainLoader(cfg, 0, 1, dev, progress=False, build_ahead=False)
    n = 3 * ahead.steps_per_epoch
    got, want = [next(ahead) for _ in range(n)], [next(plain) for _ in range(n)]
    assert [kind for kind, _ in ahead.builds] == ["sync", "ahead", "ahead", "ahead"]
    assert_same_batches(want, got)


@pytest.mark.gpu
def test_gpu_hardware_decoder_share_changes_speed_not_images(tmp_path):
    """data.hw_decoder_load splits the batch between the GPU's JPEG engines and the CUDA decoder:
    0 (none on the engines) and 0.95 give the same views of the same files (the same seeds: the same
    crops, flips and jitter), up to the decoders' rounding. ImageNet-sized JPEGs, as the engines
    take only images above a minimum size."""
    from fast_ressl.benchdata import make_bench_data

    root = tmp_path / "jpegs"
    make_bench_data(root, images=32, classes=2, quiet=True)
    dev = torch.device("cuda", 0)
    got = {}
    for load in (0.0, 0.95):
        cfg = _cfg(root, **{"data.hw_decoder_load": load, "data.weak.size": 224,
                            "data.strong": "[{size: 224}]", "train.batch_size": 16})
        L = DaliTrainLoader(cfg, 0, 1, dev, progress=False)
        b = next(L)
        for x in (b.x_weak, b.x_strong[0]):
            assert x.shape == (16, 3, 224, 224) and x.device.type == "cuda" and x.dtype == torch.float16
            assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
        got[load] = b
    a, c = got[0.0], got[0.95]
    assert torch.equal(a.labels, c.labels)
    for x, y in ((a.x_weak, c.x_weak), (a.x_strong[0], c.x_strong[0])):
        # normalised units (1/255 of a level is ~0.017): the decoders agree to about a level on average
        assert (x.float() - y.float()).abs().mean().item() < 0.05


def _train_with_a_bad_file(tmp_path, device: str, capsys, loader: str = "dali", bilevel_tiff: bool = False):
    """Scan a JPEG folder (the denylist is written beside it), then overwrite one file with garbage,
    or, with bilevel_tiff, add a 1-bit TIFF before the scan (PIL decodes it: the scan passes it);
    train 2 epochs of 6 steps on `device` with `loader`: (summary, metrics rows, stderr, the file)."""
    import json

    from PIL import Image

    from fast_ressl.datasets import prepare_dataset
    from fast_ressl.train import train

    root = tmp_path / "images"
    make_jpeg_folder(root)
    victim = root / "class_1" / ("odd_bilevel.tif" if bilevel_tiff else "img_004.JPEG")
    if bilevel_tiff:
        Image.open(root / "class_1" / "img_004.JPEG").convert("1").save(victim, format="TIFF")
    cfg = load_config(None, tiny_overrides(root, **{
        "model.backbone": "test_resnet", "model.proj_hidden_dim": 32, "model.proj_dim": 16,
        "method.compile_loss": "false", "train.epochs": 2, "train.log_every": 1, "optim.warmup_epochs": 0.5,
        "run.device": device, "data.loader": loader, "run.dir": str(tmp_path / "run")}))
    assert prepare_dataset(cfg, progress=False).bad_files == []
    if not bilevel_tiff:
        victim.write_bytes(b"garbage" * 50)
    capsys.readouterr()
    summary = train(cfg, live=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, rows, capsys.readouterr().err, str(victim)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_file_only_pil_decodes_is_replaced_not_fatal(tmp_path, capsys, device):
    """A bilevel TIFF passes the scan (PIL decodes it) but not DALI's CPU TIFF parser ("missing:
    BitsPerSample"). Its batch failed, every file of it decoded with PIL, so the error was taken for
    not the data's and the run ended there, at the same step on every relaunch. Now DALI's own
    decoder is asked too (in child processes; on CUDA the mixed decoder): the file is replaced
    within its batch, reported, and every step runs. The GPU's decoders may well decode the file:
    then there is nothing to report, and the run must simply finish."""
    summary, rows, err, victim = _train_with_a_bad_file(tmp_path, device, capsys, bilevel_tiff=True)
    assert summary["status"] == "completed"
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    if device == "cpu" or summary["bad_files"]:
        assert summary["bad_files"] == [victim]
        assert f"{victim} failed to decode mid-run (DALI cannot decode it: " in err


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_gpu_training_replaces_a_file_gone_bad_after_the_scan(tmp_path, capsys, loader):
    """A training run on CUDA meets a file overwritten after the scan. dali: DALI's mixed decoder
    (nvImageCodec on the GPU) fails the batch as the CPU decoder does (tests/test_faults.py checks
    that path on the CPU with 2 ranks); torch: the reference loader's workers, their batches pinned
    and copied to the GPU without blocking (the bench's reference preset runs this path). Either
    way the file is replaced within its batch, every step runs, and its path is reported."""
    summary, rows, err, victim = _train_with_a_bad_file(tmp_path, "cuda", capsys, loader)
    assert summary["status"] == "completed" and summary["bad_files"] == [victim]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 13))
    assert f"{victim} failed to decode mid-run" in err


def _short_demo(tmp_path, device: str) -> dict:
    """configs/demo.yaml (the README's `make demo`) for 2 epochs on `device`, with the kNN monitor
    after each and the three-way comparison at the end: the run's knn.json."""
    import json
    from pathlib import Path

    from fast_ressl.train import train

    recipe = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    cfg = load_config(str(recipe), ["train.epochs=2", "eval.knn_every_epochs=1", f"run.device={device}",
                                     f"data.embedded_dir={tmp_path / 'embedded'}", f"run.dir={tmp_path / 'run'}"])
    summary = train(cfg, live=False)
    assert summary["status"] == "completed"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "knn_top1" in r] == [0, 1]
    return json.loads((tmp_path / "run" / "knn.json").read_text())


@pytest.mark.gpu
def test_gpu_short_demo_runs_the_knn_monitor_through_the_gpu_eval_pipeline(tmp_path):
    """`make demo` on a GPU, 2 of its 50 epochs: the embedded digits through DALI's mixed decode for
    training and through the GPU eval pipeline (resize, centre crop, normalise) for the kNN monitor.
    The raw-pixel kNN is a check of that pipeline alone (no training in it): 92.2% at the demo's
    8 px on the CPU pipeline (README), and an eval pipeline that mangled images (a wrong layout,
    crop or normalisation) would fall far below; the pretrained and random-init figures only need
    to be real percentages after 2 epochs."""
    knn = _short_demo(tmp_path, "cuda")
    assert knn["raw_pixels"]["top1"] > 85.0, knn
    for key in ("pretrained", "random_init"):
        assert 10.0 < knn[key]["top1"] <= 100.0, knn
