"""The torchvision reference loader (`data.loader=torch`): torch DataLoader + PIL transforms.

It reproduces the original ReSSL code's augmentations (the MoCo-v2 recipe, ReSSL `main_imagenet`):

    strong: RandomResizedCrop(size, scale) -> RandomApply(ColorJitter(b, c, s, h), p=jitter_p)
            -> RandomGrayscale(grayscale_p) -> RandomApply(GaussianBlur(sigma ~ U[min, max]), blur_p)
            -> [RandomSolarize(threshold, solarize_p)] -> RandomHorizontalFlip(flip_p) -> ToTensor -> Normalize
    weak:   RandomResizedCrop(size, scale) -> RandomHorizontalFlip(flip_p) -> ToTensor -> Normalize

(GaussianBlur is MoCo's: PIL `ImageFilter.GaussianBlur(radius=sigma)`.) Each image is decoded once
(EXIF orientation applied, converted to RGB) and both views come from it. The same config keys and
the same file list, denylist scan, per-epoch permutation and rank blocks as the DALI loader are used
(`fast_ressl.datasets`), so both loaders read the same images in the same order. It is the benchmark
baseline and the fallback where DALI cannot be installed.

Determinism and resume: the augmentation RNG of each sample is seeded from (data.seed, epoch, rank,
position in the epoch), so a batch depends only on its place in the run; the state is (epoch,
batches handed out) and a restore gives the same next batches.

Stop signals: the workers ignore SIGTERM and SIGINT (`start_workers`); the trainer alone decides
when to stop, at a step boundary with a checkpoint, and then stops them.
"""
from __future__ import annotations

import atexit
import multiprocessing.util
import os
import random
import shutil
import signal
import sys
import weakref
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import Batch, EndlessLoader, torch_dtype
from .datasets import (DataError, FileDataset, check_image, dataset_identity, epoch_block,
                       first_on_machine, pil_rgb, prepare_dataset, report_left_out)


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """DataLoader worker_init_fn: ignore the stop signals (dist.STOP_SIGNALS: SIGTERM, SIGINT,
    SIGHUP, SIGUSR1).

    Stop signals often reach the whole process group: torchrun sends SIGTERM to each worker's group
    on preemption (os.killpg), a batch scheduler signals every process of the job, Ctrl-C goes to the
    terminal's foreground group. A worker killed by one makes torch raise "DataLoader worker (pid N)
    is killed by signal: Terminated" in the trainer at whatever line it is on (seen inside the stop
    checkpoint's config hash): a traceback and no checkpoint instead of exit 143 at a step boundary.
    The trainer stops the workers itself (stop_workers); they also exit on their own within 5 s
    (torch's MP_STATUS_CHECK_INTERVAL) of their parent's death."""
    from .dist import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()  # DataLoader iterators with live workers


def start_workers(dataset: Dataset, **dataloader_kwargs) -> Iterator:
    """iter(DataLoader(dataset, **dataloader_kwargs)), its workers leaving stop signals to the
    trainer; stop them with stop_workers (or let the exit hook below do it)."""
    dl = DataLoader(dataset, worker_init_fn=_leave_stop_signals_to_the_trainer, **dataloader_kwargs)
    it = iter(dl)
    if dl.num_workers > 0:
        _LIVE_ITERATORS.add(it)
    return it


def stop_workers(it: Iterator) -> None:
    """torch's shutdown (a stop message to each worker, up to 5 s to exit), then SIGKILL for any
    still running: they ignore SIGTERM, so torch's own fallback (terminate) cannot stop them."""
    _LIVE_ITERATORS.discard(it)
    if not hasattr(it, "_shutdown_workers"):
        return
    it._shutdown_workers()
    for w in it._workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _stop_workers_at_exit() -> None:
    """Workers still running when the process exits: torch's own shutdown does nothing once its
    exit flag is set, and multiprocessing's exit hook terminates its daemonic children with SIGTERM,
    ignored here, and then joins them: it would wait for ever (seen: a probe hung until killed).
    Registered twice so it runs before that join whatever the order of exit hooks: as an atexit hook
    (hooks run last-registered first; this one is registered after torch's and multiprocessing's,
    unless multiprocessing's get_logger() re-registers its hook later) and as a multiprocessing
    finalizer (run inside multiprocessing's hook, before the join)."""
    for it in list(_LIVE_ITERATORS):
        stop_workers(it)


atexit.register(_stop_workers_at_exit)
multiprocessing.util.Finalize(None, _stop_workers_at_exit, exitpriority=0)


class GaussianBlur:
    """MoCo v2's blur: PIL Gaussian blur with radius sigma ~ U[sigma_min, sigma_max]."""

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))


def _normalize(d):
    from torchvision import transforms as T

    return [T.ToTensor(), T.Normalize(d.mean, d.std)]


def weak_transform(d, crop):
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(crop.size, scale=(crop.scale_min, crop.scale_max)),
                      T.RandomHorizontalFlip(d.augment.flip_p), *_normalize(d)])


def strong_transform(d, crop):
    from torchvision import transforms as T

    a = d.augment
    ops = [T.RandomResizedCrop(crop.size, scale=(crop.scale_min, crop.scale_max)),
           T.RandomApply([T.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)], p=a.jitter_p),
           T.RandomGrayscale(p=a.grayscale_p),
           T.RandomApply([GaussianBlur((a.blur_sigma_min, a.blur_sigma_max))], p=a.blur_p)]
    if a.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=int(round(255 * a.solarize_threshold)), p=a.solarize_p))
    ops += [T.RandomHorizontalFlip(a.flip_p), *_normalize(d)]
    return T.Compose(ops)


def eval_transform(d, size: int, resize_shorter: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_shorter), T.CenterCrop(size), *_normalize(d)])


def _to_out(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


SHM = "/dev/shm"
_HELD = 2  # batches the consumer holds in shared memory besides those in flight


def fit_prefetch(workers: int, prefetch: int, batch_bytes: int, what: str, shm: str = SHM) -> int:
    """The DataLoader prefetch factor that fits this node's shared memory.

    Workers hand their batches to the main process through /dev/shm, up to workers x prefetch at a
    time. A container's default /dev/shm is small (64 MB under Docker without --ipc=host or
    --shm-size: a fraction of one fp32 224 px batch of 256, 154 MB per view), and an overflow kills
    the workers mid-run with a wall of "No space left on device" tracebacks. So: the largest
    prefetch <= `prefetch` whose batches fit in 90% of the free space, shared by the ranks on this
    node (LOCAL_WORLD_SIZE), with a warning when lowered; a DataError naming the fixes when not even
    one batch per worker fits. Without /dev/shm (not Linux) nothing is checked."""
    if workers <= 0:
        return prefetch
    try:
        free = shutil.disk_usage(shm).free
    except OSError:
        return prefetch
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    share = int(0.9 * free) // ranks
    # besides workers x prefetch batches in flight, the consumer still holds the batch of the step
    # and the one before it (a tiny /dev/shm overflowed here with exactly that many more)
    room = (share // max(1, batch_bytes) - _HELD) // workers
    if room >= prefetch:
        return prefetch
    mb = 1 << 20

    def need(p: int) -> str:
        return f"{(workers * p + _HELD) * batch_bytes / mb:.1f} MiB"

    where = f"{shm} has {free / mb:.1f} MiB free" + (f" ({share / mb:.1f} MiB for each of {ranks} ranks here)"
                                                   if ranks > 1 else "")
    if room >= 1:
        print(f"fast-ressl: warning: {where}; the {what}'s {workers} workers x prefetch {prefetch} of "
              f"{batch_bytes / mb:.2f} MiB batches would need {need(prefetch)}: prefetch lowered to {room} "
              f"(give the container more: docker run --ipc=host or --shm-size)", file=sys.stderr)
        return int(room)
    raise DataError(f"{where}, but the {what}'s {workers} workers need {need(1)} for one "
                    f"{batch_bytes / mb:.2f} MiB batch each: give the container shared memory "
                    f"(docker run --ipc=host, or --shm-size=...), or lower data.num_threads or "
                    f"train.batch_size, or use data.loader=dali (no shared memory)")


class _TwoViewDataset(Dataset):
    """Item (epoch, position, index) -> (weak, [strong...], label), RNG seeded per item."""

    def __init__(self, ds: FileDataset, cfg, rank: int):
        d = cfg.data
        self.ds, self.seed, self.rank = ds, d.seed, rank
        self.weak = weak_transform(d, d.weak)
        self.strong = [strong_transform(d, c) for c in d.strong]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: Tuple[int, int, int]):
        epoch, pos, idx = key
        seed = int(np.random.SeedSequence([self.seed, epoch, self.rank, pos]).generate_state(1)[0])
        torch.manual_seed(seed)
        random.seed(seed)
        bad = []
        for attempt in range(len(self.ds)):  # a file gone bad since the scan: the next good one
            path = self.ds.files[(idx + attempt) % len(self.ds)]
            try:
                img = pil_rgb(path)  # decoded once, both views from it
                break
            except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
                bad.append((path, f"{type(e).__name__}: {e}"))
        else:
            raise DataError(f"no file of {self.ds.root} decodes any more")
        label = self.ds.labels[(idx + len(bad)) % len(self.ds)]
        return self.weak(img), [t(img) for t in self.strong], label, bad


class _Collate:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, items):
        weak = _to_out(torch.stack([it[0] for it in items]), self.dtype)
        strong = [_to_out(torch.stack([it[1][v] for it in items]), self.dtype)
                  for v in range(len(items[0][1]))]
        labels = torch.tensor([it[2] for it in items], dtype=torch.int64)
        return weak, strong, labels, [b for it in items for b in it[3]]


class _Batches:
    """Endless batch sampler from (epoch, step): lists of (epoch, position, index).

    Holds plain values only, no reference to the loader: a loader <-> DataLoader-iterator reference
    cycle would leave worker shutdown to the cyclic GC, which then waits 5 s per worker."""

    def __init__(self, n: int, seed: int, rank: int, steps: int, batch: int, epoch: int, step: int):
        self.n, self.seed, self.rank, self.steps, self.batch = n, seed, rank, steps, batch
        self.epoch, self.step = epoch, step

    def __iter__(self):
        epoch, step, B = self.epoch, self.step, self.batch
        while True:
            block = epoch_block(self.n, self.seed, epoch, self.rank, self.steps * B)
            for s in range(step, self.steps):
                yield [(epoch, s * B + j, block[s * B + j]) for j in range(B)]
            epoch, step = epoch + 1, 0


# The training DataLoader's prefetch factor (batches each worker may have ready or in the making),
# lowered where /dev/shm cannot hold them (fit_prefetch)
PREFETCH = 4


class TorchLoader(EndlessLoader):
    """Endless iterator of `Batch` (CPU tensors, pinned when the device is CUDA).

    Attributes: steps_per_epoch, batch_size (per rank), dataset, bad_files (list[str]), bad_reasons.
    Workers: data.num_threads DataLoader processes (0 = in the main process).
    """

    def __init__(self, cfg, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                 progress: bool = True, num_workers: Optional[int] = None):
        d = cfg.data
        if d.source == "webdataset":
            raise DataError("data.loader=torch reads folder, filelist and embedded sources; "
                            "use data.loader=dali for webdataset shards")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = torch.device(device)
        self.batch_size = cfg.train.batch_size // world_size
        # the scanning message from whichever rank scans: each node's first (datasets.prepare_dataset)
        self.dataset = prepare_dataset(cfg, rank=rank, progress=progress and first_on_machine(rank))
        self.bad_files: List[str] = list(self.dataset.bad_files)
        self.bad_reasons = dict(self.dataset.bad_reasons)
        self.steps_per_epoch = (len(self.dataset) // world_size) // self.batch_size
        if self.steps_per_epoch < 1:
            raise DataError(f"{len(self.dataset)} good images are fewer than one global batch "
                            f"train.batch_size={cfg.train.batch_size} (world size {world_size})")
        self.num_workers = d.num_threads if num_workers is None else num_workers
        self.dtype = torch_dtype(d.dtype)
        self._ds = _TwoViewDataset(self.dataset, cfg, rank)
        self.midrun_bad: dict = {}  # files that failed to decode after the scan {path: reason}
        self.epoch, self.step_in_epoch = 0, 0
        self._it: Optional[Iterator] = None
        self._blocks: dict = {}
        self._prefetch: Optional[int] = None  # DataLoader prefetch factor: PREFETCH, or what /dev/shm holds

    def epoch_indices(self, epoch: int) -> List[int]:
        if epoch not in self._blocks:
            self._blocks = {epoch: epoch_block(len(self.dataset), self.cfg.data.seed, epoch, self.rank,
                                               self.steps_per_epoch * self.batch_size)}
        return self._blocks[epoch]

    def epoch_files(self, epoch: int) -> Tuple[List[str], List[int]]:
        block = self.epoch_indices(epoch)
        return [self.dataset.files[i] for i in block], [self.dataset.labels[i] for i in block]

    @property
    def in_flight_batches(self) -> int:
        """Batches the workers may have ready or in the making before the consumer asks for them
        (workers x prefetch factor): a benchmark's warm-up takes at least these, or its timed
        windows drain a stock made before them."""
        return self.num_workers * (self._prefetch or PREFETCH)

    @property
    def cycle_batches(self) -> int:
        """Batches of one round of the workers (the DataLoader takes them in turn, one batch each):
        a timed window of a multiple of it holds every worker's batch alike."""
        return max(1, self.num_workers)

    def batch_bytes(self) -> int:
        """Bytes of one collated batch as the workers hand it over (all views in data.dtype)."""
        d = self.cfg.data
        pixels = sum(3 * c.size * c.size for c in [d.weak, *d.strong])
        return self.batch_size * (pixels * torch.empty((), dtype=self.dtype).element_size() + 8)

    def _start(self) -> None:
        w = self.num_workers
        batches = _Batches(len(self.dataset), self.cfg.data.seed, self.rank, self.steps_per_epoch,
                           self.batch_size, self.epoch, self.step_in_epoch)
        if w > 0 and self._prefetch is None:  # checked once: the first start sizes every later one
            self._prefetch = fit_prefetch(w, PREFETCH, self.batch_bytes(), "torch loader")
        self._it = start_workers(self._ds, batch_sampler=batches, num_workers=w, collate_fn=_Collate(self.dtype),
                                 pin_memory=self.device.type == "cuda", persistent_workers=False,
                                 prefetch_factor=self._prefetch if w > 0 else None)

    def next_batch(self) -> Batch:
        if self.num_workers == 0:  # per-sample seeding must not disturb the trainer's global RNG
            with torch.random.fork_rng(devices=[]):
                state = random.getstate()
                try:
                    out = self._next()
                finally:
                    random.setstate(state)
        else:
            out = self._next()
        return self._advance(out)

    def _next(self):
        if self._it is None:
            self._start()
        return next(self._it)

    def _advance(self, out) -> Batch:
        weak, strong, labels, bad = out
        for path, reason in bad:  # replaced by the next good file of the dataset (deterministic)
            if path not in self.midrun_bad:
                self.midrun_bad[path] = reason
                self.bad_reasons[path] = reason
                self.bad_files.append(path)
                print(f"fast-ressl: rank {self.rank}: {path} failed to decode mid-run ({reason}); replaced "
                      "by the next good file; `fast-ressl scan` refreshes the denylist", file=sys.stderr)
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return Batch(x_weak=weak, x_strong=strong, labels=labels)

    def close(self) -> None:
        """Stop the worker processes (also done when the loader is deleted)."""
        it, self._it = self._it, None
        if it is not None:
            stop_workers(it)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def data_identity(self) -> dict:
        """datasets.dataset_identity of the files the epochs are drawn from."""
        return dataset_identity(self.dataset)

    def state_dict(self) -> dict:
        """Position, and the files that failed mid-run (relative to the root) for the summary."""
        root = self.dataset.root
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "midrun_bad": [[os.path.relpath(p, root) if root else p, r] for p, r in sorted(self.midrun_bad.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.close()  # workers of the old position are dropped with the iterator
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        for rel, reason in state.get("midrun_bad", []):
            path = os.path.normpath(os.path.join(self.dataset.root, rel)) if self.dataset.root else rel
            if path not in self.midrun_bad:
                self.midrun_bad[path] = reason
                self.bad_reasons[path] = reason
                self.bad_files.append(path)


class _EvalItems(Dataset):
    """(image or None, label, path, None or why it failed): a file gone bad since the scan is
    reported by the loader, not raised in a worker (which would end the pass, and through the kNN
    monitor the training run)."""

    def __init__(self, ds: FileDataset, transform):
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        path = self.ds.files[i]
        try:
            return self.transform(pil_rgb(path)), self.ds.labels[i], path, None
        except Exception:  # noqa: BLE001 - whatever PIL raised; check_image says it plainly
            return None, self.ds.labels[i], path, check_image(path) or "cannot decode"


def _collate_good(items) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[str, str]]]:
    """(N, 3, H, W) images and (N,) labels of the items that decoded, and [(path, reason)] of the rest."""
    good = [(x, y) for x, y, _, bad in items if bad is None]
    x = torch.stack([x for x, _ in good]) if good else torch.empty(0)
    return x, torch.tensor([y for _, y in good], dtype=torch.int64), [(p, r) for _, _, p, r in items if r]


def good_batches(batches, rank: int, found: List[str]):
    """(images, labels) of each `_collate_good` batch that kept any; every file that failed is
    reported and appended to `found` (for the caller to leave out of later passes)."""
    for x, y, bad in batches:
        for path, reason in bad:
            report_left_out(path, reason, rank)
            found.append(path)
        if y.numel():
            yield x, y


class TorchEvalLoader:
    """One pass over a class-folder root (or FileDataset): (images, labels), resize shorter side to
    data.eval_resize -> center crop data.weak.size -> normalise; channels_last, data.dtype; every
    file once in listing order (rank r of w takes the r-th contiguous part, like DALI)."""

    def __init__(self, cfg, root, device: torch.device | str = "cpu", batch_size: int = 256,
                 rank: int = 0, world_size: int = 1, size: Optional[int] = None,
                 resize_shorter: Optional[int] = None, progress: bool = True,
                 num_workers: Optional[int] = None):
        import copy

        d = cfg.data
        if isinstance(root, FileDataset):
            ds = root
        else:
            sub = copy.deepcopy(cfg)
            sub.data.source, sub.data.root, sub.data.denylist = "folder", str(root), None
            ds = prepare_dataset(sub, rank=rank, progress=progress)
        self.dataset = ds.block(rank, world_size)
        self.bad_files = list(ds.bad_files)
        self.rank = rank
        self.batch_size = batch_size
        self.dtype = torch_dtype(d.dtype)
        self.device = torch.device(device)
        self.num_workers = d.num_threads if num_workers is None else num_workers
        self.transform_size = size or d.weak.size
        self.transform = eval_transform(d, self.transform_size, resize_shorter or d.eval_resize)
        self._prefetch: Optional[int] = None  # DataLoader prefetch factor: 2, or what /dev/shm holds

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    @property
    def images(self) -> int:
        """Images a pass yields now: the block less the files passes have left out."""
        return len(self.dataset)

    def __iter__(self):
        w = self.num_workers
        if w > 0 and self._prefetch is None:  # once per loader: the kNN monitor iterates every epoch
            size = self.transform_size  # workers hand over fp32 (ToTensor + Normalize)
            self._prefetch = fit_prefetch(w, 2, self.batch_size * (3 * size * size * 4 + 8), "eval loader")
        # (the kNN monitor's loader too: a stop signal during its check must not kill its workers)
        it = start_workers(_EvalItems(self.dataset, self.transform), batch_size=self.batch_size,
                           shuffle=False, num_workers=w, pin_memory=self.device.type == "cuda",
                           prefetch_factor=self._prefetch if w > 0 else None, collate_fn=_collate_good)
        found: List[str] = []
        try:
            for x, y in good_batches(it, self.rank, found):
                yield _to_out(x, self.dtype), y
        finally:
            stop_workers(it)
            if found:  # left out of later passes too
                self.bad_files += found
                self.dataset = self.dataset.without(found)
