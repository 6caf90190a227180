"""Loader throughput: DALI pipeline (CPU-only mode, or mixed decode on a GPU) vs the torchvision
reference loader, full weak + strong augmentation, side by side in one run.

Data: ImageNet-like JPEGs made from scikit-image's bundled photographs (random crops rescaled to
about 400x350 px on average, quality 90), written once to --data (default bench_out/loader_jpegs, ignored
by git), 8 class folders.

Reported figure: source images/s (one image = its weak + strong view), after warm-up, median of
--repeats timed windows of --batches batches each, the two loaders' windows interleaved (epoch
boundaries fall inside the windows as they come; the DALI loader builds each next epoch's pipeline
ahead on a side thread, as in training, so a boundary costs what it costs a training run). Run:

    .venv/bin/python benchmarks/bench_loader.py --threads 2 --batch 64
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from fast_ressl.config import load_config


def make_jpegs(out: str, n: int, seed: int = 0) -> str:
    """n JPEGs, ~400x350 px average, q90, from skimage sample photos; skipped if already there."""
    done = os.path.join(out, f"DONE-{n}")
    if os.path.exists(done):
        return out
    import skimage.data as sd
    from PIL import Image

    photos = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket(), sd.immunohistochemistry(),
              sd.hubble_deep_field(), sd.retina(), sd.colorwheel(),
              np.stack([sd.camera()] * 3, -1), np.stack([sd.coins()] * 3, -1)]
    rng = np.random.default_rng(seed)
    for i in range(n):
        src = photos[i % len(photos)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        tw, th = int(rng.uniform(300, 500)), int(rng.uniform(260, 440))
        img = Image.fromarray(np.ascontiguousarray(src[y:y + ch, x:x + cw])).resize((tw, th), Image.BILINEAR)
        d = os.path.join(out, f"c{i % 8}")
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f"{i:05d}.JPEG"), quality=90)
    open(done, "w").close()
    return out


def measure(it, warmup: int, batches: int, repeats: int, batch: int, sync) -> list[float]:
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(batches):
            b = next(it)
        sync()
        rates.append(batches * batch / (time.perf_counter() - t0))
        del b
    return rates


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="bench_out/loader_jpegs")
    ap.add_argument("--images", type=int, default=3200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loaders", default="dali,torch")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for DALI mixed decode")
    args = ap.parse_args(argv)

    root = make_jpegs(args.data, args.images)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loaders = {}
    for kind in args.loaders.split(","):
        cfg = load_config(None, [f"data.source=folder", f"data.root={root}", f"data.loader={kind}",
                                 f"data.weak.size={args.size}", f"data.strong=[{{size: {args.size}}}]",
                                 f"train.batch_size={args.batch}", f"method.queue_size={args.batch}",
                                 f"data.num_threads={args.threads}"])
        if kind == "dali":
            from pipelines_dali.loader import DaliTrainLoader

            loaders[kind] = iter(DaliTrainLoader(cfg, 0, 1, device, progress=False))
        else:
            from fast_ressl.data_torch import TorchLoader

            loaders[kind] = iter(TorchLoader(cfg, 0, 1, device, progress=False))
    # Interleaved windows (dali, torch, dali, torch, ...) so that both loaders see the same
    # background load on a shared machine. Each window first drains what the loader prefetched
    # while the other one was timed (--warmup batches), then times --batches batches.
    rates = {k: [] for k in loaders}
    for _ in range(args.repeats):
        for kind, it in loaders.items():
            rates[kind] += measure(it, args.warmup, args.batches, 1, args.batch, sync)
    results = {k: statistics.median(v) for k, v in rates.items()}
    for kind, r in results.items():
        print(f"{kind:6s} {r:8.1f} images/s (median of {[round(x, 1) for x in rates[kind]]})", flush=True)
    if "dali" in results and "torch" in results:
        print(f"DALI / torchvision = {results['dali'] / results['torch']:.2f}x")
    try:
        import nvidia.dali as dali  # noqa: F401  (version only)
        dv = dali.__version__
    except ImportError:
        dv = "n/a"
    import torchvision

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; python "
          f"{sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"DALI {dv}; {args.images} JPEGs, batch {args.batch}, {args.size} px, threads/workers {args.threads}")


if __name__ == "__main__":
    main()
