"""The embedded demo dataset: real JPEG class folders made from scikit-learn's bundled digits.

`data.source=embedded` needs no download: on first use the 1,797 handwritten digits that
scikit-learn ships (8x8 px, 17 grey levels, 10 classes, UCI optdigits test set) are upscaled to
32x32 px (bicubic), given a little colour (a per-image random ink/paper tint, so the colour
augmentations have something to act on) and written as quality-95 RGB JPEGs:

    <embedded_dir>/digits-v1/train/<0..9>/<index>.jpg   1,438 images (80%, stratified)
    <embedded_dir>/digits-v1/val/<0..9>/<index>.jpg       359 images (20%)

The split and the tints are fixed by a seed, so every machine materialises the same files. The
folder is written to a temporary name and renamed, so an interrupted run never leaves half a
dataset; `data/` is git-ignored. Processes that start together (the ranks of a torchrun job, on
each node) take turns on a lock file beside it: the first materialises, the others find it done.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict

from .locks import exclusive

VERSION = "digits-v1"
SIZE = 32
VAL_FRACTION = 0.2
_SEED = 1234


def embedded_root(embedded_dir: str | os.PathLike = "data/embedded") -> str:
    return os.path.join(os.path.abspath(os.fspath(embedded_dir)), VERSION)


def ensure_embedded(embedded_dir: str | os.PathLike = "data/embedded", quiet: bool = False) -> Dict[str, str]:
    """Materialise the dataset if missing; returns {"train": path, "val": path}."""
    root = embedded_root(embedded_dir)
    paths = {"train": os.path.join(root, "train"), "val": os.path.join(root, "val")}
    if os.path.isfile(os.path.join(root, "DONE")):
        return paths
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    # Without the lock, two ranks of `torchrun ... configs/demo.yaml` on a fresh machine each wrote
    # the dataset, and the second to finish deleted the first's finished copy (to rename its own
    # over it) while the first was scanning it: "class folder .../train/2 has no decodable image".
    with exclusive(os.path.join(parent, f".{VERSION}.lock")):
        if not os.path.isfile(os.path.join(root, "DONE")):  # another process may have finished meanwhile
            _materialise(root, parent, quiet)
    return paths


def _materialise(root: str, parent: str, quiet: bool) -> None:
    """Write the dataset to a temporary folder under `parent` and rename it to `root`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target  # (1797, 8, 8) in 0..16, (1797,)
    rng = np.random.default_rng(_SEED)
    val = np.zeros(len(targets), dtype=bool)
    for c in range(10):  # stratified split
        idx = np.flatnonzero(targets == c)
        val[rng.choice(idx, size=int(round(len(idx) * VAL_FRACTION)), replace=False)] = True
    tmp = tempfile.mkdtemp(prefix=".tmp-" + VERSION, dir=parent)
    try:
        for i, (img8, c) in enumerate(zip(images, targets)):
            split = "val" if val[i] else "train"
            folder = os.path.join(tmp, split, str(int(c)))
            os.makedirs(folder, exist_ok=True)
            gray = Image.fromarray((img8 * (255.0 / 16.0)).astype(np.uint8), mode="L")
            gray = gray.resize((SIZE, SIZE), Image.BICUBIC)
            ink = rng.uniform(160, 255, size=3)
            paper = rng.uniform(0, 90, size=3)
            a = np.asarray(gray, dtype=np.float32)[..., None] / 255.0
            rgb = (paper * (1 - a) + ink * a).clip(0, 255).astype(np.uint8)
            Image.fromarray(rgb, mode="RGB").save(os.path.join(folder, f"{i:04d}.jpg"), quality=95)
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write(f"{VERSION}: sklearn load_digits, {SIZE}px, seed {_SEED}\n")
        # Where the lock did not reach (a filesystem without working flock), another process may
        # have finished meanwhile: keep its copy, which a rank may be reading, and drop this one.
        if os.path.exists(root) and not os.path.isfile(os.path.join(root, "DONE")):
            shutil.rmtree(root)  # an unfinished copy of an older version of this code
        try:
            os.replace(tmp, root)
        except OSError:  # a finished copy appeared in between (a folder is not renamed over one)
            if not os.path.isfile(os.path.join(root, "DONE")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone already once renamed)
        raise
    if not quiet:
        print(f"fast-ressl: materialised the embedded digits dataset in {root} "
              f"({int((~val).sum())} train / {int(val.sum())} val JPEGs)")
