"""Shared fixtures: tiny generated JPEG class folders, with odd-but-valid and bad files on demand."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one; `pytest -m gpu` runs only these)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _backend_flags_as_they_were():
    """Each test starts from the backend flags in force before it: an in-process training run with
    train.deterministic=true leaves torch's deterministic-algorithms mode on (configure_backends),
    which would change later tests' kernels in the same process (an xdist worker on the GPU runs
    many; found in review)."""
    from fast_ressl.bench import backend_flags_restored

    with backend_flags_restored():
        yield


def _smooth_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A colourful, smooth random image (gradients + blobs + a little noise), uint8 HxWx3."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(0, 6.28)
        img[..., c] = 128 + 90 * np.sin(a * xx / w * 3.14 + b * yy / h * 3.14 + ph)
    for _ in range(3):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4, max(5, min(w, h) / 3))
        mask = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def make_jpeg_folder(root: Path, classes: int = 3, per_class: int = 16, size=(64, 48), seed: int = 0,
                     quality: int = 90, vary_size: bool = True) -> List[str]:
    """root/<class_k>/img_<i>.JPEG; returns the file paths (sorted as listing gives them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = size
            if vary_size:
                w, h = int(w * rng.uniform(0.8, 1.25)), int(h * rng.uniform(0.8, 1.25))
            p = d / f"img_{i:03d}.JPEG"
            Image.fromarray(_smooth_image(rng, w, h)).save(p, quality=quality)
            paths.append(str(p))
    return sorted(paths)


def add_odd_files(folder: Path, seed: int = 1) -> Dict[str, str]:
    """Odd but valid files in `folder`: {kind: path}. EXIF-rotated: stored 48x32, orientation 6."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_smooth_image(rng, 48, 32))
    out = {}
    out["cmyk"] = str(folder / "odd_cmyk.JPEG")
    rgb.convert("CMYK").save(out["cmyk"], quality=90)
    out["gray"] = str(folder / "odd_gray.JPEG")
    rgb.convert("L").save(out["gray"], quality=90)
    out["png"] = str(folder / "odd_png.JPEG")
    rgb.save(out["png"], format="PNG")
    out["exif"] = str(folder / "odd_exif.JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display -> 32 wide, 48 high
    rgb.save(out["exif"], quality=90, exif=exif.tobytes())
    return out


def add_bad_files(folder: Path, seed: int = 2) -> Dict[str, str]:
    """Bad files in `folder`: {kind: path} (truncated JPEG, zero-byte, text named .JPEG)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(_smooth_image(rng, 64, 48)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    out = {"truncated": str(folder / "bad_truncated.JPEG"), "empty": str(folder / "bad_empty.JPEG"),
           "text": str(folder / "bad_text.JPEG")}
    Path(out["truncated"]).write_bytes(data[: len(data) // 2])
    Path(out["empty"]).write_bytes(b"")
    Path(out["text"]).write_text("this is not an image\n" * 20)
    return out


@pytest.fixture
def jpeg_folder(tmp_path) -> Path:
    """3 classes x 16 clean JPEGs of about 64x48 px."""
    root = tmp_path / "images"
    make_jpeg_folder(root)
    return root


@pytest.fixture
def messy_folder(tmp_path):
    """3 classes x 16 clean JPEGs + 4 odd-but-valid (class_0) + 3 bad files (class_1).

    Returns (root, odd {kind: path}, bad {kind: path})."""
    root = tmp_path / "messy"
    make_jpeg_folder(root)
    odd = add_odd_files(root / "class_0")
    bad = add_bad_files(root / "class_1")
    return root, odd, bad


def free_port() -> int:
    """A free TCP port on loopback (a rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> List[str]:
    """`torchrun --nproc_per_node=nproc -m fast_ressl ARGS` with its rendezvous on a free loopback port."""
    import sys

    port = free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "fast_ressl", *args]


def tiny_overrides(root: os.PathLike | str, **extra) -> List[str]:
    """Overrides for a fast CPU loader at 32 px."""
    base = {"data.source": "folder", "data.root": str(root), "data.weak.size": 32,
            "data.strong": "[{size: 32}]", "train.batch_size": 8, "method.queue_size": 64,
            "data.num_threads": 2, "data.max_bad_fraction": 0.2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def assert_same_batches(want, got) -> None:
    """Each pair of Batch objects has identical views and labels (resume gives the same data)."""
    import torch

    for a, b in zip(want, got):
        assert torch.equal(a.x_weak, b.x_weak) and torch.equal(a.x_strong[0], b.x_strong[0])
        assert torch.equal(a.labels, b.labels)


def start_together(tmp: Path, code: str, envs: List[Dict[str, str]], timeout: float = 300) -> List[tuple]:
    """Run the Python `code` in one process per entry of `envs` (added to this environment), each
    released at the same moment after its imports: the ranks of a torchrun job reaching the same
    first-use preparation at once. `code` runs as `python -c code TMP`; returns [(rc, stdout, stderr)]."""
    import subprocess
    import sys
    import time

    gate = ("import sys, time\nfrom pathlib import Path\nTMP = Path(sys.argv[1])\n"
            "(TMP / f'ready-{__import__(\"os\").getpid()}').touch()\n"
            "while not (TMP / 'go').exists():\n    time.sleep(0.005)\n")
    head, _, body = code.partition("# --- start\n")  # imports before the gate, the work after it
    procs = [subprocess.Popen([sys.executable, "-c", head + gate + body, str(tmp)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) for env in envs]
    t0 = time.time()
    while len(list(tmp.glob("ready-*"))) < len(procs):
        if time.time() - t0 > timeout or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            raise AssertionError(f"not all started: {[p.communicate() for p in procs]}")
        time.sleep(0.01)
    (tmp / "go").touch()
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]
