"""`fast-ressl make-bench-data OUT --images N`: an ImageNet-like JPEG class-folder tree for benchmarks.

Decode cost depends on pixel count and on how much detail the entropy coder has to undo, so the
images are real photographs (the ones scikit-image ships, no download) cut into random crops,
rescaled, flipped and tinted, then saved with a JPEG quality drawn per image. The targets are
ImageNet-1k train's rough averages: about 400x350 px and about 110 KB per file (measured on the
generated set and printed; `tests/test_bench.py` checks the ranges).

The output is deterministic for a given seed and count; an existing complete set (marker file
`.bench-data-<N>-<seed>`) is reused.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

# Photographs that scikit-image bundles (no pooch download); grayscale ones are tinted to RGB.
_RGB = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
_GRAY = ("camera", "coins", "moon", "brick", "grass", "gravel")


def _photos() -> List[np.ndarray]:
    """The bundled photographs as HWC uint8 RGB. One that this scikit-image cannot load (a version
    that moved it to its download registry; the GPU machine has no internet) is left out with a
    warning; fewer than 4 is an error (the set would be too uniform to be ImageNet-like)."""
    import skimage.data as sd

    out, missing = [], []
    for name in _RGB + _GRAY:
        try:
            img = np.asarray(getattr(sd, name)())
        except Exception as e:  # noqa: BLE001 - AttributeError, or pooch's download error offline
            missing.append(f"{name} ({type(e).__name__})")
            continue
        out.append(np.ascontiguousarray(img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2))[..., :3])
    if missing:
        print(f"make-bench-data: scikit-image could not load {', '.join(missing)}; using the other "
              f"{len(out)} photographs", file=sys.stderr)
    if len(out) < 4:
        raise RuntimeError(f"make-bench-data: only {len(out)} of scikit-image's bundled photographs load "
                           f"(missing: {', '.join(missing)}); it needs at least 4")
    return out


def _one_image(photo: np.ndarray, rng: np.random.Generator):
    """A random crop (10-100% of the area, aspect 3/4-4/3) of `photo`, rescaled to a size drawn
    around 400x350, maybe flipped, maybe tinted, grained and sharpened; plus the JPEG quality and
    chroma subsampling to save it with (tuned so that the mean file is about 110 KB)."""
    from PIL import Image, ImageEnhance, ImageFilter

    h, w = photo.shape[:2]
    area = h * w * rng.uniform(0.1, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
    ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    img = Image.fromarray(photo[y:y + ch, x:x + cw])
    # Output size: mostly landscape ~400-500 x 300-375 (ImageNet's 500x375/500x333 modes), some
    # portrait and square, some small: mean about 400x350.
    kind = rng.random()
    if kind < 0.6:
        tw, th = int(rng.uniform(380, 500)), int(rng.uniform(280, 400))
    elif kind < 0.8:
        tw, th = int(rng.uniform(280, 380)), int(rng.uniform(380, 500))
    else:
        s = int(rng.uniform(200, 400))
        tw, th = s, int(s * rng.uniform(0.9, 1.1))
    img = img.resize((tw, th), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:  # colour variety (and colour for the grayscale sources)
        img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.6))
        tint = np.array(img, np.float32) * rng.uniform(0.8, 1.2, 3)
        img = Image.fromarray(tint.clip(0, 255).astype(np.uint8))
    # Sensor-like grain: the bundled photos are cleaner than typical web JPEGs (and upscaled crops
    # are smooth), which would make files too small and decodes too cheap.
    arr = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 6), (th, tw, 1))
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    img = img.filter(ImageFilter.UnsharpMask(radius=2, percent=300, threshold=0))  # crisp like web photos
    quality = int(np.clip(rng.normal(94, 2.5), 85, 98))
    subsampling = 0 if rng.random() < 0.5 else 2  # half 4:4:4, half 4:2:0 chroma
    return img, quality, subsampling


_OWN_DIR, _OWN_FILE = re.compile(r"c\d{2,}"), re.compile(r"\d{6}\.JPEG")


def _remove_previous_set(out: Path) -> None:
    """Before writing a set of other parameters (image or class count, seed) into `out`: remove the
    files an earlier make-bench-data wrote there (its c<k>/<i>.JPEG names, markers, stats.json), or
    a smaller set would leave the larger one's extra images for the loader to read, and a set with
    another class count would mix both trees. Nothing else in `out` is touched."""
    if not out.is_dir():
        return
    for d in out.iterdir():
        if d.is_dir() and not d.is_symlink() and _OWN_DIR.fullmatch(d.name):
            for f in d.iterdir():
                if f.is_file() and _OWN_FILE.fullmatch(f.name):
                    f.unlink()
            if not any(d.iterdir()):
                d.rmdir()
        elif d.is_file() and (d.name.startswith(".bench-data-") or d.name == "stats.json"):
            d.unlink()


def make_bench_data(out: str | os.PathLike, images: int = 2560, classes: int = 10, seed: int = 0,
                    quiet: bool = False) -> Dict[str, float]:
    """Write `images` JPEGs into out/c<k>/ (k < classes); returns statistics (also in out/stats.json)."""
    out = Path(out)
    marker = out / f".bench-data-{images}-{classes}-{seed}"
    stats_path = out / "stats.json"
    if marker.exists() and stats_path.exists():
        return json.loads(stats_path.read_text())
    _remove_previous_set(out)
    rng = np.random.default_rng(seed)
    photos = _photos()
    t0 = time.perf_counter()
    sizes, widths, heights, qualities = [], [], [], []
    for i in range(images):
        img, q, sub = _one_image(photos[int(rng.integers(len(photos)))], rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=q, subsampling=sub)
        d = out / f"c{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.JPEG").write_bytes(buf.getvalue())
        sizes.append(buf.tell())
        widths.append(img.width)
        heights.append(img.height)
        qualities.append(q)
        if not quiet and (i + 1) % 500 == 0:
            print(f"  {i + 1}/{images} images", flush=True)
    stats = {"images": images, "classes": classes, "seed": seed,
             "mean_kb": float(np.mean(sizes)) / 1024, "median_kb": float(np.median(sizes)) / 1024,
             "mean_width": float(np.mean(widths)), "mean_height": float(np.mean(heights)),
             "mean_quality": float(np.mean(qualities)), "total_mb": float(np.sum(sizes)) / 2**20,
             "seconds": round(time.perf_counter() - t0, 2)}
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    marker.write_text("")
    if not quiet:
        print(f"wrote {images} JPEGs to {out}: mean {stats['mean_width']:.0f}x{stats['mean_height']:.0f} px, "
              f"{stats['mean_kb']:.0f} KB (median {stats['median_kb']:.0f} KB), "
              f"mean quality {stats['mean_quality']:.1f}, {stats['total_mb']:.0f} MB")
    return stats


def add_cli_command(sub) -> None:
    p = sub.add_parser("make-bench-data", help="write an ImageNet-like JPEG folder for benchmarks",
                       description="Write an ImageNet-like class-folder tree of JPEGs (about 400x350 px "
                       "and 110 KB on average) made from scikit-image's bundled photographs: random "
                       "crops, scales, flips and tints, JPEG quality drawn per image. No download.")
    p.add_argument("out", help="output directory (e.g. bench_out/jpegs)")
    p.add_argument("--images", type=int, default=2560, help="number of images (default 2560)")
    p.add_argument("--classes", type=int, default=10, help="class folders (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: (make_bench_data(a.out, a.images, a.classes, a.seed), 0)[1])
