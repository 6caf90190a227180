"""Evaluation and export of a pretrained backbone: weighted kNN, linear probe, timm-loadable weights.

- `knn_classify`: the common weighted kNN protocol (InstDisc/DINO): L2-normalised features, cosine
  similarity, the k nearest training samples vote for their class with weight exp(sim / T)
  (k=200, T=0.1 by default).
- `knn_monitor`: called by the training loop on every rank at every epoch boundary; every
  `eval.knn_every_epochs` epochs it extracts features of a labelled training subset and of the
  validation set with the student backbone (eval mode, center crops), each rank its own block, gathers
  them and logs kNN top-1/top-5 to metrics.jsonl and the console. At the last epoch, with
  `eval.knn_compare_random=true`, it also prints the same number for the same backbone randomly
  initialised and for the raw pixels (`RawPixels`), all through the same kNN: the demo's "did it
  learn" lines.
- `linear_probe`: frozen backbone (eval mode), one Linear layer initialised N(0, 0.01), SGD lr 0.3,
  momentum 0.9, no weight decay, batch 256, cosine, RandomResizedCrop + flip (the paper's protocol);
  reports the FINAL epoch's top-1/top-5 (not the best).
- `export_backbone`: the backbone's weights as safetensors with the keys of
  `timm.create_model(name, num_classes=0).state_dict()`; `load_exported` rebuilds a timm model from
  such a file (including the small-input-stem ResNets, which plain timm cannot build).

Eval data: `data.source=embedded` uses the embedded train/val folders; `folder` uses `data.root`
(train) and `data.val_root`; other sources need explicit `--train-root/--val-root`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import log
from .config import Config, CropConfig, from_dict

_EXPORT_FORMAT = "fast_ressl-backbone-v1"


# ----------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1,
                 chunk: int = 1024) -> torch.Tensor:
    """Class scores (M, num_classes) of the weighted kNN vote: each of the k nearest training
    features (cosine similarity s) adds exp(s / T) to its class. Features are L2-normalised here."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = train_labels.to(train.device, torch.int64)
    k = min(k, train.shape[0])
    out = []
    for i in range(0, test.shape[0], chunk):
        sim = test[i:i + chunk] @ train.T  # (m, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(sim.shape[0], num_classes, device=train.device)
        scores.scatter_add_(1, labels[top_idx], weights)
        out.append(scores)
    return torch.cat(out)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> Dict[str, float]:
    """Top-k accuracies in percent (k capped at the number of classes)."""
    labels = labels.to(scores.device)
    order = scores.argsort(dim=1, descending=True)
    res = {}
    for k in ks:
        hit = (order[:, :min(k, scores.shape[1])] == labels[:, None]).any(dim=1)
        res[f"top{k}"] = 100.0 * hit.float().mean().item()
    return res


# ----------------------------------------------------------------------------- data
def eval_roots(cfg: Config, train_root: Optional[str] = None,
               val_root: Optional[str] = None) -> Tuple[str, str]:
    """(train class folders, val class folders) for evaluating a run of `cfg`."""
    d = cfg.data
    if train_root is None or val_root is None:
        if d.source == "embedded":
            from .embedded import ensure_embedded

            paths = ensure_embedded(d.embedded_dir, quiet=True)
            train_root = train_root or paths["train"]
            val_root = val_root or d.val_root or paths["val"]
        elif d.source == "folder":
            train_root = train_root or d.root
            val_root = val_root or d.val_root
    if not train_root or not val_root:
        raise ValueError(f"no labelled eval data for data.source={d.source}: pass --train-root and "
                         "--val-root (class folders), or set data.val_root with data.source=folder")
    return str(train_root), str(val_root)


def _is_train_root(cfg: Config, root: str) -> bool:
    """Whether `root` is the class-folder root training reads (then `data.denylist` is its denylist)."""
    d = cfg.data
    if d.source == "folder" and d.root:
        train = d.root
    elif d.source == "embedded":
        from .embedded import ensure_embedded

        train = ensure_embedded(d.embedded_dir, quiet=True)["train"]
    else:
        return False
    return os.path.abspath(train) == os.path.abspath(root)


def _denylist_path(cfg: Config, root: str) -> str:
    """The denylist of the class folders at `root`: `data.denylist` for the training root, the default
    location for any other root (the custom file lists the training set's bad files: read for a val
    root its file count would not match and the val scan would overwrite it)."""
    from .datasets import default_denylist_path

    if cfg.data.denylist and _is_train_root(cfg, root):
        return cfg.data.denylist
    root = os.path.abspath(root)
    return default_denylist_path(root, root)


def _subset(ds, max_samples: int, seed: int):
    """A fixed random subset of `max_samples` files of `ds` in listing order (all when 0 or more)."""
    from .datasets import FileDataset

    if not max_samples or len(ds) <= max_samples:
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = sorted(torch.randperm(len(ds), generator=g)[:max_samples].tolist())
    return FileDataset([ds.files[i] for i in idx], [ds.labels[i] for i in idx], ds.classes, ds.root,
                       ds.bad_files, ds.bad_reasons)


def in_train_classes(val_ds, train_ds):
    """`val_ds` with its labels as indices into `train_ds.classes`. Each root's labels index its own
    sorted class folders, so a val root missing one class folder shifted every later label and kNN
    and the linear probe scored against the wrong classes without a word (found in review: raw-pixel
    kNN on copies of the train images fell from 100% to 0% with val/class_0 removed). Raises
    ValueError naming the val classes the training set lacks (nothing could predict them)."""
    from .datasets import FileDataset

    if val_ds.classes == train_ds.classes or not val_ds.classes or not train_ds.classes:
        return val_ds
    index = {c: i for i, c in enumerate(train_ds.classes)}
    unknown = [c for c in val_ds.classes if c not in index]
    if unknown:
        raise ValueError(f"the validation set has {len(unknown)} class folder(s) the training set lacks "
                         f"({', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}): a kNN or linear "
                         "probe cannot predict them")
    return FileDataset(val_ds.files, [index[val_ds.classes[y]] for y in val_ds.labels], list(train_ds.classes),
                       val_ds.root, val_ds.bad_files, val_ds.bad_reasons)


def _dataset(cfg: Config, root: str, max_samples: int = 0, seed: int = 0):
    """The class folders at `root` (bad files dropped via the denylist scan), optionally a fixed
    random subset of `max_samples` files."""
    from .datasets import prepare_dataset

    sub = copy.deepcopy(cfg)
    sub.data.source, sub.data.root = "folder", str(root)
    sub.data.denylist = _denylist_path(cfg, root)
    return _subset(prepare_dataset(sub, progress=False), max_samples, seed)


def eval_batches(cfg: Config, ds, device: torch.device, batch_size: int = 256):
    """Center-crop eval batches (resize shorter side to data.eval_resize, crop data.weak.size) from
    the configured loader (DALI, or the torchvision reference loader)."""
    if cfg.data.loader == "dali":
        try:
            from pipelines_dali.loader import DaliEvalLoader

            return DaliEvalLoader(cfg, ds, device=device, batch_size=batch_size, progress=False)
        except ImportError:
            pass
    from .data_torch import TorchEvalLoader

    return TorchEvalLoader(cfg, ds, device=device, batch_size=batch_size, progress=False,
                           num_workers=0 if len(ds) <= 4096 else None)


def _autocast(device: torch.device, precision: str):
    """The backbone's forward in the precision the run trained in (train.precision; auto = bf16 on
    CUDA): a run trained in fp32, as the official code, is evaluated in fp32. It was bf16 on every
    GPU whatever the run's precision: ~0.35% off fp32 features (found in review). On the CPU, fp32."""
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16,
                          enabled=device.type == "cuda" and dtype is not None)


_AUTOCAST = {"bf16": torch.bfloat16, "auto": torch.bfloat16, "fp16": torch.float16}


def _eval_input(x: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """The loader's batch (data.dtype: fp16 by default) as the backbone takes it: as it is under
    autocast, float32 where the forward runs in fp32 (the CPU, an fp32 run on a GPU: a half input
    to fp32 weights is an error there)."""
    from .train import _prep  # the training step's own hand-over (train imports this module)

    return _prep(x, device, fp32=device.type != "cuda" or precision not in _AUTOCAST, cl=True)


@torch.no_grad()
def extract_features(backbone: nn.Module, batches, device: torch.device,
                     precision: str = "fp32") -> Tuple[torch.Tensor, torch.Tensor]:
    """Pooled backbone features (N, D) float32 and labels (N,) int64 of every batch (eval mode; the
    module's mode is restored), the forward in `precision` (_autocast). N may be 0: a block whose
    files were all left out."""
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for x, y in batches:
            x = _eval_input(x, device, precision)
            with _autocast(device, precision):
                f = backbone(x)
            feats.append(f.float())
            labels.append(y.to(device))
    finally:
        backbone.train(was_training)
    if not feats:  # (torch.cat of nothing raises: on one rank of several, the others would wait)
        return (torch.zeros(0, feature_dim(backbone), device=device),
                torch.zeros(0, dtype=torch.int64, device=device))
    return torch.cat(feats), torch.cat(labels)


class _CachedImages:
    """Decoded center-crop batches kept in memory (small eval sets: the monitor decodes once)."""

    def __init__(self, batches):
        self.items = [(x.clone(), y.clone()) for x, y in batches]
        self.images = sum(int(y.shape[0]) for _, y in self.items)  # what a pass yields

    def __iter__(self):
        return iter(self.items)


def _images_bytes(cfg: Config, n: int) -> int:
    """Bytes of `n` kept center crops, in the eval loaders' output dtype (data.dtype)."""
    from .data import torch_dtype

    return n * 3 * cfg.data.weak.size ** 2 * torch_dtype(cfg.data.dtype).itemsize


def _kept_if_small(cfg: Config, ds, device: torch.device, batch_size: int):
    """Eval batches of `ds`, decoded once and kept when the crops fit in eval.cache_mb, else an eval
    loader that decodes again on every pass (ImageNet's 1.28M crops at 224 px are 385 GB in bf16)."""
    batches = eval_batches(cfg, ds, device, batch_size)
    return _CachedImages(batches) if _images_bytes(cfg, len(ds)) <= cfg.eval.cache_mb * 2 ** 20 else batches


# Raw pixels as features are 3 * size**2 floats an image (150,528 at 224 px: ImageNet's 50k val
# images alone are 30 GB a copy, and the gather, the centring and the normalising each hold one).
RAW_PIXELS_MAX_BYTES = 4 * 2 ** 30


def raw_pixels_left_out(n_images: int, size: int) -> Optional[str]:
    """Why the raw-pixel baseline is left out for `n_images` crops of `size` px, or None."""
    n_bytes = n_images * 3 * size * size * 4
    if n_bytes <= RAW_PIXELS_MAX_BYTES:
        return None
    return (f"{n_images} images x {3 * size * size} floats = {n_bytes / 2 ** 30:.1f} GiB of features, over "
            f"{RAW_PIXELS_MAX_BYTES / 2 ** 30:.0f} GiB")


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (runs/<name>), its checkpoints/ folder or a checkpoint file -> the .pt file."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.pt", p / "last.pt"):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"{p} holds no checkpoints/last.pt (is it a run directory?)")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such run directory or checkpoint file")
    return p


def run_dir_of_checkpoint(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def backbone_state(sd: dict, which: str = "student") -> Dict[str, torch.Tensor]:
    """`backbone.*` tensors of the student or teacher state dict, prefix stripped."""
    net = sd[which]
    out = {}
    for key, value in net.items():
        key = _strip(key)
        if key.startswith("backbone."):
            out[key[len("backbone."):]] = value
    if not out:
        raise ValueError(f"the checkpoint's {which} holds no backbone.* weights")
    return out


def build_backbone(cfg: Config, state: Optional[Dict[str, torch.Tensor]] = None,
                   seed: int = 0) -> nn.Module:
    """The timm backbone of `cfg.model` (with the small-input stem if configured); `state` None =
    random initialisation (seeded), the same initialisation training starts from
    (model.zero_init_last)."""
    from .model import create_backbone

    torch.manual_seed(seed)
    m = create_backbone(cfg.model)
    if state is not None:
        m.load_state_dict(state, strict=True)
    return m


def feature_dim(backbone: nn.Module) -> int:
    """Width of a timm backbone's pooled output (num_classes=0)."""
    return getattr(backbone, "head_hidden_size", None) or backbone.num_features


class RawPixels(nn.Module):
    """The eval images themselves as "features": the center crops as the networks see them (resized,
    normalised with data.mean/std), flattened to 3 * size**2 values. Used through the same
    extraction, gather and kNN as a backbone, then mean-centred by `centre_pixels` (knn_classify
    L2-normalises). The baseline a pretrained backbone should beat on small, aligned images: on the
    embedded digits (8x8 px, centred) raw pixels are a strong kNN feature."""

    def __init__(self, size: int):
        super().__init__()
        self.num_features = 3 * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().flatten(1)  # logical (C, H, W) order whatever the memory format


def centre_pixels(train_feats: torch.Tensor, *others: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Subtract the training features' mean (per dimension) from every set: without it every pixel
    vector shares the common mean image (dark background, bright centre) and cosine similarity is
    dominated by it."""
    mean = train_feats.mean(0, keepdim=True)
    return (train_feats - mean, *(f - mean for f in others))


def raw_pixel_knn(train_batches, val_batches, num_classes: int, size: int, device: torch.device,
                  k: int = 200, temperature: float = 0.1) -> Dict[str, float]:
    """kNN top-1/top-5 of the mean-centred raw pixels (one process; the monitor gathers instead)."""
    px = RawPixels(size)
    tf, tl = extract_features(px, train_batches, device)
    vf, vl = extract_features(px, val_batches, device)
    tf, vf = centre_pixels(tf, vf)
    return topk_accuracy(knn_classify(tf, tl, vf, num_classes, k, temperature), vl)


def load_backbone(path: str | os.PathLike, which: str = "student",
                  device: torch.device | str = "cpu") -> Tuple[nn.Module, Config, Path]:
    """(backbone, config, checkpoint path) from a run directory or checkpoint file."""
    from .checkpoint import safe_load

    ckpt = resolve_checkpoint(path)
    sd = safe_load(ckpt, map_location="cpu")
    if "config" not in sd or which not in sd:
        raise ValueError(f"{ckpt} is not a fast_ressl checkpoint (needs 'config' and '{which}')")
    cfg = from_dict(sd["config"])
    bb = build_backbone(cfg, backbone_state(sd, which))
    return bb.to(device).to(memory_format=torch.channels_last), cfg, ckpt


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- offline kNN
def knn_eval(backbone: nn.Module, train_batches, val_batches, num_classes: int, device: torch.device,
             k: int = 200, temperature: float = 0.1, precision: str = "fp32") -> Dict[str, float]:
    tf, tl = extract_features(backbone, train_batches, device, precision)
    vf, vl = extract_features(backbone, val_batches, device, precision)
    return topk_accuracy(knn_classify(tf, tl, vf, num_classes, k, temperature), vl)


def knn_command(path: str, teacher: bool = False, train_root: Optional[str] = None,
                val_root: Optional[str] = None, k: int = 200, temperature: float = 0.1,
                train_samples: int = 0, compare_random: bool = False, batch_size: int = 256,
                device: str = "auto", out: Optional[str] = None) -> dict:
    """`fast-ressl knn`: weighted kNN top-1/top-5 of a run's backbone; JSON next to the run."""
    dev = _device(device)
    which = "teacher" if teacher else "student"
    backbone, cfg, ckpt = load_backbone(path, which, dev)
    tr_root, va_root = eval_roots(cfg, train_root, val_root)
    tr_ds = _dataset(cfg, tr_root, train_samples)
    va_ds = in_train_classes(_dataset(cfg, va_root), tr_ds)
    num_classes = len(tr_ds.classes)
    t0 = time.perf_counter()
    # three feature sets with compare_random: the crops decoded once when they fit in eval.cache_mb
    keep = _kept_if_small if compare_random else eval_batches
    tr, va = keep(cfg, tr_ds, dev, batch_size), keep(cfg, va_ds, dev, batch_size)
    res: Dict[str, Any] = {"checkpoint": str(ckpt), "weights": which, "backbone": cfg.model.backbone,
                           "k": k, "temperature": temperature, "train_root": tr_root,
                           "val_root": va_root, "train_samples": len(tr_ds), "val_samples": len(va_ds)}
    res["pretrained"] = knn_eval(backbone, tr, va, num_classes, dev, k, temperature, cfg.train.precision)
    if compare_random:
        rnd = build_backbone(cfg, None, seed=cfg.train.seed).to(dev).to(memory_format=torch.channels_last)
        res["random_init"] = knn_eval(rnd, tr, va, num_classes, dev, k, temperature, cfg.train.precision)
        why = raw_pixels_left_out(len(tr_ds) + len(va_ds), cfg.data.weak.size)
        if why is None:
            res["raw_pixels"] = raw_pixel_knn(tr, va, num_classes, cfg.data.weak.size, dev, k, temperature)
        else:
            res["raw_pixels_left_out"] = why
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    out_path = Path(out) if out else run_dir_of_checkpoint(ckpt) / "knn.json"
    replaced = _previous_knn(out_path)
    log.write_json(out_path, res)
    log.info(_knn_line(res, k, temperature) + f"; written to {out_path}" + (
        f" (it held {replaced}; --out FILE keeps both)" if replaced else ""))
    return res


def _previous_knn(path: Path) -> str:
    """What a knn.json about to be replaced held ('' if nothing readable): a demo's or a training
    run's three-way comparison went without a word when `fast-ressl knn RUN` wrote its own (found by
    a README walkthrough)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return ""
    held = [key for key in ("pretrained", "random_init", "raw_pixels") if isinstance(old, dict) and key in old]
    if not held:
        return ""
    at = f" at step {old['step']}" if "step" in old else ""
    return f"{', '.join(held)}{at}"


def _knn_line(res: dict, k: int, temperature: float) -> str:
    """One line for the pretrained backbone alone; with the baselines (compare_random) one line per
    feature set, the same kNN for all three, with the pretrained backbone's margin over each."""
    p = res["pretrained"]
    head = f"kNN (k={k}, T={temperature}) val top-1"
    if "random_init" not in res:
        return f"{head} {p['top1']:.2f}%  top-5 {p['top5']:.2f}%"
    lines = [f"{head}, one kNN function for all three feature sets:",
             f"  pretrained backbone          {p['top1']:6.2f}%"]
    for key, name, what in (("random_init", "same backbone, random init", "random init"),
                            ("raw_pixels", "raw pixels (mean-centred)", "raw pixels")):
        if key in res:
            r = res[key]["top1"]
            lines.append(f"  {name:<28} {r:6.2f}%   pretrained {p['top1'] - r:+.2f} points vs {what}")
    if "raw_pixels_left_out" in res:
        lines.append(f"  raw pixels left out: {res['raw_pixels_left_out']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- online monitor
class _MonitorData:
    """Per-run cache of this rank's share of the monitor's eval data (built on the first call)."""

    key: Optional[str] = None
    train: Any = None  # this rank's block of the kNN train subset as eval batches; None: no images
    val: Any = None  # ... of the validation set
    num_classes: int = 0
    disabled_reason: Optional[str] = None
    precision: str = "fp32"  # the run's train.precision: the forward's (_autocast)


_MONITOR = _MonitorData()


def _scanned_folder(cfg: Config, root: str, env: Any):
    """The class folders at `root`, bad files dropped, prepared once for all ranks: rank 0 lists the
    folder and reads its denylist, and the other ranks get both from it over the gloo control group
    (no rank but 0 lists). Without a current denylist each rank decodes its block of the files and
    rank 0 writes the merged denylist, so an ImageNet-size val scan is split over the ranks instead of
    keeping the others waiting for rank 0. A failure raises DataError on every rank."""
    from . import dist
    from .datasets import DataError, apply_denylist, list_folder, read_denylist, scan_files, write_denylist

    d = cfg.data
    listing: Any = None
    if env.is_main:
        try:
            ds = list_folder(root)
            path = _denylist_path(cfg, ds.root)
            bad = None if d.scan else {}
            if d.scan and os.path.exists(path):
                num_files, known = read_denylist(path, ds.root)
                bad = known if num_files == len(ds.files) else None  # else the folder changed since
            listing = (ds, path, bad)
        except Exception as err:  # sent to every rank: the others must not wait for a listing
            listing = str(err) if isinstance(err, DataError) else f"{root}: {err}"  # DataError names it
    listing = dist.gather_objects(listing, env)[0]
    if isinstance(listing, str):
        raise DataError(listing)
    ds, path, bad = listing
    if bad is None:
        if env.is_main:
            log.info(f"kNN monitor: no denylist for {ds.root}; decoding its {len(ds)} files once over "
                     f"{env.world_size} rank(s) (writes {path})")
        mine = scan_files(ds.block(env.rank, env.world_size).files, num_threads=d.num_threads, progress=False)
        bad = {p: reason for part in dist.gather_objects(mine, env) for p, reason in part.items()}
        if env.is_main:
            write_denylist(path, len(ds.files), bad, ds.root)
    return apply_denylist(ds, bad, d.max_bad_fraction, where=ds.root)


def _train_files(cfg: Config, root: str, loader: Any, env: Any):
    """The labelled training files: the training loader's dataset when it reads `root` (the usual
    case: listed and denylisted at start, with `data.denylist` honoured, so nothing is listed or
    scanned again; ImageNet: 1.28M files, about an hour to rescan), else `_scanned_folder`."""
    from .datasets import FileDataset

    ds = getattr(loader, "dataset", None)
    if isinstance(ds, FileDataset) and ds.classes and ds.root == os.path.abspath(root):
        return ds
    return _scanned_folder(cfg, root, env)


def _block_batches(cfg: Config, ds, env: Any):
    """Eval batches of this rank's block of `ds` (None when the block is empty: fewer images than
    ranks), decoded once and kept when the block's crops fit in eval.cache_mb (per rank)."""
    block = ds.block(env.rank, env.world_size)
    if not len(block):
        return None
    return _kept_if_small(cfg, block, env.device, cfg.eval.batch_size)


def _monitor_data(cfg: Config, env: Any, loader: Any) -> Optional[_MonitorData]:
    e = cfg.eval
    from .config import to_dict

    d = to_dict(cfg)
    key = json.dumps({"data": d["data"], "eval": d["eval"], "rank": env.rank, "world_size": env.world_size,
                      "device": str(env.device)}, sort_keys=True)  # not id(cfg): ids are reused
    _MONITOR.precision = cfg.train.precision
    if _MONITOR.key == key:
        return None if _MONITOR.disabled_reason else _MONITOR
    _MONITOR.key, _MONITOR.disabled_reason = None, None
    def off(err: ValueError) -> None:  # for the run: the same reason on every rank
        _MONITOR.key, _MONITOR.disabled_reason = key, str(err)
        if env.is_main:
            log.info(f"kNN monitor off: {err}")

    try:
        tr_root, va_root = eval_roots(cfg)
    except ValueError:  # decided by cfg alone; eval_roots' text names the knn command's flags
        return off(ValueError(f"no labelled eval data for data.source={cfg.data.source}: the monitor reads "
                              "data.root and data.val_root (class folders) with data.source=folder, or the "
                              "embedded data; eval.knn_every_epochs=0 turns it off"))
    tr_ds = _subset(_train_files(cfg, tr_root, loader, env), e.knn_train_samples, cfg.data.seed)
    va_ds = _subset(_scanned_folder(cfg, va_root, env), e.knn_val_samples, cfg.data.seed)
    try:
        va_ds = in_train_classes(va_ds, tr_ds)
    except ValueError as err:  # decided by the listings, the same on every rank
        return off(err)
    _MONITOR.num_classes = len(tr_ds.classes)
    _MONITOR.train, _MONITOR.val = _block_batches(cfg, tr_ds, env), _block_batches(cfg, va_ds, env)
    _MONITOR.key = key  # complete: later calls reuse it
    return _MONITOR


@torch.no_grad()
def gather_features(backbone: nn.Module, batches, env: Any,
                    precision: str = "fp32") -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Features (N, D) float32 and labels (N,) int64 of all ranks' blocks, concatenated in rank order
    on every rank (with contiguous blocks: the order one process extracting everything gives), and the
    images each rank extracted (world_size ints). `batches` is this rank's block (None: empty): an
    eval loader or cached batches, whose `images` says what a pass yields now (the block less the
    files its passes have left out, reported as they were found).

    Collectives, the same on every rank: all_gather of the counts, then of the features and labels
    padded to the largest block (all_gather needs equal shapes; blocks differ by one image at most,
    plus what was left out). A rank that extracted other than its loader's `images` (a loader that
    dropped or repeated images without saying so) raises on every rank."""
    from . import dist

    f, y = extract_features(backbone, [] if batches is None else batches, env.device, precision)  # (0, D) if none
    expected = 0 if batches is None else int(batches.images)
    if not env.distributed:
        pairs = [[f.shape[0], expected]]
    else:
        pairs = dist.all_gather_cat(torch.tensor([[f.shape[0], expected]], device=env.device), env).tolist()
    if any(c != e for c, e in pairs):  # the same on every rank
        raise RuntimeError(f"eval feature extraction: the ranks extracted {[c for c, _ in pairs]} images where "
                           f"their loaders hold {[e for _, e in pairs]} (a loader dropped or repeated "
                           "images without reporting them)")
    counts = [c for c, _ in pairs]
    if not env.distributed:
        return f, y, counts
    m = max(counts)
    f_all = dist.all_gather_cat(F.pad(f, (0, 0, 0, m - f.shape[0])), env)  # (world*m, D)
    y_all = dist.all_gather_cat(F.pad(y, (0, m - y.shape[0])), env)
    keep = torch.cat([torch.arange(r * m, r * m + c) for r, c in enumerate(counts)]).to(env.device)
    return f_all[keep], y_all[keep], counts


@contextlib.contextmanager
def _rank0_buffers(module: nn.Module, env: Any):
    """Rank 0's buffers (BN running statistics) in `module` on every rank for the duration, each
    rank's own restored afterwards. DDP does not sync buffers in the forward, so every rank's student
    has its own statistics; rank 0's are the ones its checkpoint holds and `fast-ressl knn` uses, so
    all blocks are extracted with the same network."""
    if not env.distributed:
        yield
        return
    buffers = list(module.buffers())
    own = [b.clone() for b in buffers]
    for b in buffers:
        torch.distributed.broadcast(b, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, saved in zip(buffers, own):
                b.copy_(saved)


def _monitor_features(backbone: nn.Module, data: _MonitorData, env: Any):
    """(train features (N, D), train labels (N,), val features (M, D), val labels (M,), images each rank
    extracted (world_size ints, train + val)) of `backbone` over all ranks' blocks with rank 0's
    buffers, the same on every rank: what one process extracting the whole subset and val set gets."""
    with _rank0_buffers(backbone, env):
        tf, tl, tc = gather_features(backbone, data.train, env, data.precision)
        vf, vl, vc = gather_features(backbone, data.val, env, data.precision)
    return tf, tl, vf, vl, [a + b for a, b in zip(tc, vc)]


def _knn_pass(backbone: nn.Module, data: _MonitorData, env: Any, k: int,
              temperature: float) -> Tuple[Dict[str, float], List[int]]:
    """kNN top-1/top-5 of `backbone` (the same on every rank) and the images each rank extracted."""
    tf, tl, vf, vl, per_rank = _monitor_features(backbone, data, env)
    if isinstance(backbone, RawPixels):  # identical on every rank: the gathered sets are
        tf, vf = centre_pixels(tf, vf)
    return topk_accuracy(knn_classify(tf, tl, vf, data.num_classes, k, temperature), vl), per_rank


def knn_monitor(cfg: Config, env: Any, state: Any, meter: Any, epoch: int, total_epochs: int) -> None:
    """Called by the loop on every rank after each completed epoch (`epoch` counts from 1).

    Every rank decodes and forwards its own block of the kNN train subset and of the val set (about
    1/world_size of the images each, with rank 0's BN statistics) and the features are gathered, so
    every rank computes the 1-process kNN result; rank 0 logs it and writes metrics.jsonl (with the
    images each rank extracted) and, at the end, knn.json. The training set's file list comes from
    the training loader (no listing or scan of it here); the val set is scanned on the first call,
    split over the ranks, and cached.

    No rank can sit out a whole check in a collective and hit train.dist_timeout_s: all ranks do the
    check in parallel and meet only in the gathers, where a rank waits for the others to finish their
    blocks of the same size (the skew between ranks, not the length of the check). The one wait on a
    single rank is rank 0 listing the val folder on the first call."""
    e = cfg.eval
    final = epoch >= total_epochs
    due = bool(e.knn_every_epochs) and epoch % e.knn_every_epochs == 0
    compare = final and e.knn_compare_random
    if not (due or compare):
        return
    data = _monitor_data(cfg, env, state.loader)
    if data is None:
        return
    t0 = time.perf_counter()
    backbone = getattr(state.student, "module", state.student).backbone
    pretrained, per_rank = _knn_pass(backbone, data, env, e.knn_k, e.knn_t)
    res = {"pretrained": pretrained}
    record = {"step": state.step, "epoch": epoch - 1, "knn_top1": pretrained["top1"],
              "knn_top5": pretrained["top5"], "knn_images_per_rank": per_rank}
    if compare:  # the same seed on every rank: the same random weights, no broadcast needed
        rnd = build_backbone(cfg, None, seed=cfg.train.seed).to(env.device)
        rnd = rnd.to(memory_format=torch.channels_last)
        res["random_init"], _ = _knn_pass(rnd, data, env, e.knn_k, e.knn_t)
        record["knn_top1_random_init"] = res["random_init"]["top1"]
        # raw pixels through the same blocks, gather and kNN (cost: one pass over the cached crops)
        why = raw_pixels_left_out(sum(per_rank), cfg.data.weak.size)  # the same on every rank
        if why is None:
            res["raw_pixels"], _ = _knn_pass(RawPixels(cfg.data.weak.size), data, env, e.knn_k, e.knn_t)
            record["knn_top1_raw_pixels"] = res["raw_pixels"]["top1"]
        else:
            res["raw_pixels_left_out"] = why
    if not env.is_main:
        return
    record["knn_s"] = round(time.perf_counter() - t0, 3)
    record["time"] = time.time()
    if meter.metrics is not None:
        meter.metrics.write(record)
    head, _, rows = _knn_line(res, e.knn_k, e.knn_t).partition("\n")  # the figures stay the last lines
    log.info(f"epoch {epoch}/{total_epochs}: {head}  [{record['knn_s']:.1f} s]" + (f"\n{rows}" if rows else ""))
    if compare:
        from .train import run_dir_of

        log.write_json(run_dir_of(cfg) / "knn.json", {"step": state.step, "k": e.knn_k,
                                                       "temperature": e.knn_t, **res})


# ----------------------------------------------------------------------------- linear probe
class _TrainBatches:
    """RandomResizedCrop(size, scale 0.08-1) + flip batches over `ds`, reshuffled every epoch.

    A file gone bad since the scan is reported once and left out of this epoch and the later ones,
    as the eval loaders do, instead of raising in a DataLoader worker and ending a probe that may
    have run for hours."""

    def __init__(self, cfg: Config, ds, size: int, batch_size: int, seed: int):
        from .data_torch import weak_transform

        self.ds, self.batch_size = ds, batch_size
        self.transform = weak_transform(cfg.data, CropConfig(size=size, scale_min=0.08, scale_max=1.0))
        self.generator = torch.Generator().manual_seed(seed)
        self.num_workers = 0 if len(ds) <= 4096 else cfg.data.num_threads
        self.left_out: List[str] = []
        self._loader = None

    def __iter__(self):
        from torch.utils.data import DataLoader

        from .data_torch import _collate_good, _EvalItems, good_batches

        if self._loader is None:  # workers persist across epochs until a file is left out
            w = self.num_workers
            self._loader = DataLoader(_EvalItems(self.ds, self.transform), batch_size=self.batch_size,
                                      shuffle=True, drop_last=False, num_workers=w, generator=self.generator,
                                      persistent_workers=w > 0, collate_fn=_collate_good)
        found: List[str] = []
        yield from good_batches(self._loader, 0, found)
        if found:
            self.left_out += found
            self.ds, self._loader = self.ds.without(found), None


def linear_probe(backbone: nn.Module, cfg: Config, train_ds, val_ds, device: torch.device,
                 epochs: int = 100, lr: float = 0.3, momentum: float = 0.9, weight_decay: float = 0.0,
                 batch_size: int = 256, augment: bool = True, seed: int = 0,
                 log_every_epochs: int = 10) -> dict:
    """The linear protocol on the frozen backbone; returns the final epoch's val top-1/top-5."""
    torch.manual_seed(seed)
    num_classes = len(train_ds.classes)
    backbone.eval().requires_grad_(False)
    prec = cfg.train.precision
    val_f, val_y = extract_features(backbone, eval_batches(cfg, val_ds, device, batch_size), device, prec)
    cached = None
    if not augment:  # center-crop features once: a fast probe for small data and tests
        cached = extract_features(backbone, eval_batches(cfg, train_ds, device, batch_size), device, prec)
        train_iter = None
    else:
        train_iter = _TrainBatches(cfg, train_ds, cfg.data.weak.size, batch_size, seed)
    fc = nn.Linear(val_f.shape[1], num_classes).to(device)
    nn.init.normal_(fc.weight, 0.0, 0.01)
    nn.init.zeros_(fc.bias)
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    # the cached features' count, not the dataset's: a file that fails to decode after the scan is
    # left out of them, and indexing past them crashed (found in review)
    n_train = int(cached[0].shape[0]) if cached is not None else len(train_ds)
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    history: List[dict] = []
    for epoch in range(epochs):
        if cached is not None:
            perm = torch.randperm(n_train, device=device)
            batches = ((cached[0][perm[i:i + batch_size]], cached[1][perm[i:i + batch_size]])
                       for i in range(0, n_train, batch_size))
        else:
            batches = _feature_stream(backbone, train_iter, device, prec)
        loss_sum, seen = 0.0, 0
        for f, y in batches:
            for group in opt.param_groups:  # cosine over iterations, no warm-up
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(fc(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * y.shape[0]
            seen += y.shape[0]
            step += 1
        if (epoch + 1) % log_every_epochs == 0 or epoch + 1 == epochs:
            with torch.no_grad():
                acc = topk_accuracy(fc(val_f), val_y)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), **acc})
            log.info(f"linear epoch {epoch + 1}/{epochs}: train loss {loss_sum / max(seen, 1):.4f}  "
                     f"val top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%")
    final = history[-1]
    return {"top1": final["top1"], "top5": final["top5"], "epochs": epochs, "lr": lr,
            "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
            "augment": augment, "num_classes": num_classes, "history": history,
            "train_files_left_out": train_iter.left_out if train_iter is not None else []}


def _feature_stream(backbone: nn.Module, loader, device: torch.device, precision: str):
    for x, y in loader:
        x = _eval_input(x, device, precision)
        with torch.no_grad(), _autocast(device, precision):
            f = backbone(x)
        yield f.float(), y.to(device)


def linear_command(path: str, teacher: bool = False, train_root: Optional[str] = None,
                   val_root: Optional[str] = None, epochs: int = 100, lr: float = 0.3,
                   momentum: float = 0.9, weight_decay: float = 0.0, batch_size: int = 256,
                   augment: bool = True, device: str = "auto", out: Optional[str] = None) -> dict:
    """`fast-ressl linear`: linear probe; prints and writes the final top-1/top-5."""
    dev = _device(device)
    which = "teacher" if teacher else "student"
    backbone, cfg, ckpt = load_backbone(path, which, dev)
    tr_root, va_root = eval_roots(cfg, train_root, val_root)
    t0 = time.perf_counter()
    tr_ds = _dataset(cfg, tr_root)
    res = linear_probe(backbone, cfg, tr_ds, in_train_classes(_dataset(cfg, va_root), tr_ds), dev, epochs, lr,
                       momentum, weight_decay, batch_size, augment, seed=cfg.train.seed,
                       log_every_epochs=max(1, epochs // 10))
    res.update({"checkpoint": str(ckpt), "weights": which, "backbone": cfg.model.backbone,
                "train_root": tr_root, "val_root": va_root,
                "wall_s": round(time.perf_counter() - t0, 2)})
    out_path = Path(out) if out else run_dir_of_checkpoint(ckpt) / "linear.json"
    log.write_json(out_path, res)
    log.info(f"linear probe (final epoch {epochs}): val top-1 {res['top1']:.2f}%  top-5 "
             f"{res['top5']:.2f}%; written to {out_path}")
    return res


# ----------------------------------------------------------------------------- export
def export_backbone(path: str | os.PathLike, out: str | os.PathLike, teacher: bool = False) -> dict:
    """Write the backbone as safetensors with timm's state_dict keys (no classifier: the backbone
    was built with num_classes=0). Metadata: architecture, weights (student/teacher), small stem."""
    from safetensors.torch import save_file

    from .checkpoint import safe_load

    ckpt = resolve_checkpoint(path)
    sd = safe_load(ckpt, map_location="cpu")
    which = "teacher" if teacher else "student"
    cfg = from_dict(sd["config"])
    state = {k: v.detach().contiguous().clone() for k, v in backbone_state(sd, which).items()}
    build_backbone(cfg).load_state_dict(state, strict=True)  # refuse anything timm would not load
    meta = {"format": _EXPORT_FORMAT, "architecture": cfg.model.backbone, "weights": which,
            "small_input_stem": str(bool(cfg.model.small_input_stem)).lower(),
            "num_features": str(feature_dim(build_backbone(cfg))), "step": str(sd.get("step", "")),
            "source": str(ckpt)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    name = cfg.model.backbone
    log.info(f"exported the {which} {name} backbone ({len(state)} tensors) to {out}")
    if cfg.model.small_input_stem:
        log.info("note: this backbone has the small-input stem (3x3 stride-1 conv1, no max-pool), which "
                 "timm.create_model cannot build; load it with\n  from fast_ressl.evaluate import "
                 f"load_exported; model = load_exported('{out}')")
    else:
        log.info(f"load it with timm:\n  timm.create_model('{name}', pretrained=True, "
                 f"pretrained_cfg_overlay=dict(file='{out}', num_classes=0))")
    return meta


def read_export_metadata(path: str | os.PathLike) -> Dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_exported(path: str | os.PathLike, num_classes: int = 0) -> nn.Module:
    """A timm model with an exported backbone loaded (strictly); num_classes > 0 adds a fresh head.
    Works for small-input-stem ResNets too (the stem is rebuilt before loading)."""
    import timm
    from safetensors.torch import load_file

    meta = read_export_metadata(path)
    if meta.get("format") != _EXPORT_FORMAT:
        raise ValueError(f"{path} is not a fast_ressl backbone export")
    name = meta["architecture"]
    if meta.get("small_input_stem") != "true":
        return timm.create_model(name, pretrained=True, num_classes=num_classes,
                                 pretrained_cfg_overlay=dict(file=str(path), num_classes=0))
    from .model import _small_input_stem

    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    _small_input_stem(model, name)
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    head = set(model.state_dict()) - set(timm.create_model(name, num_classes=0).state_dict())
    if unexpected or set(missing) - head:
        raise ValueError(f"{path}: unexpected keys {unexpected}, missing {sorted(set(missing) - head)}")
    return model
