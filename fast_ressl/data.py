"""The batch contract between loaders and the training loop, the synthetic source, and the loader choice.

Every loader (synthetic, DALI, torchvision reference) is an endless iterator of `Batch` with
`steps_per_epoch`, `state_dict()` and `load_state_dict()`; the loop never sees where batches come from.
DALI itself is imported only inside `pipelines_dali/`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Protocol

import torch

from .config import Config

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


@dataclass
class Batch:
    """One step's input. Image tensors are normalised, channels_last NCHW, dtype from data.dtype.

    x_weak:   (N, 3, H, W)       the teacher's weak view (data.weak.size)
    x_strong: V x (N, 3, h, w)   the student's strong views, one per data.strong entry
    labels:   (N,) int64         dataset labels (unused by pretraining; for kNN and probes)
    """

    x_weak: torch.Tensor
    x_strong: List[torch.Tensor]
    labels: torch.Tensor


class Loader(Protocol):
    steps_per_epoch: int  # batches per epoch per rank (the last partial batch is dropped)

    def __iter__(self) -> Iterator[Batch]: ...  # endless: epochs follow each other

    def state_dict(self) -> dict: ...  # position (and RNG) after the last batch handed out

    def load_state_dict(self, state: dict) -> None: ...


class EndlessLoader:
    """Base of the file loaders: an endless iterator whose batches come from `next_batch()`."""

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next_batch()

    def next_batch(self) -> Batch:
        raise NotImplementedError


class SyntheticSource:
    """Random tensors of the right shapes, made on the target device once, channels_last.

    A small pool of batches is generated from `data.seed` and cycled, so the source costs nothing
    per step (it stands in for a perfect loader in step benchmarks and fast tests). Batch i of the
    run is pool[i % pool_size]; the state is just i, so resume is exact.
    """

    def __init__(self, cfg: Config, rank: int, world_size: int, device: torch.device,
                 pool_size: int = 4):
        d = cfg.data
        self.batch_size = cfg.train.batch_size // world_size
        self.steps_per_epoch = d.num_samples // cfg.train.batch_size
        dtype = torch_dtype(d.dtype)
        gen = torch.Generator(device="cpu").manual_seed(d.seed * 1000 + rank)

        def image(size: int) -> torch.Tensor:
            x = torch.randn(self.batch_size, 3, size, size, generator=gen)
            return x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)

        self.pool = [
            Batch(x_weak=image(d.weak.size),
                  x_strong=[image(v.size) for v in d.strong],
                  labels=torch.randint(0, d.num_classes, (self.batch_size,), generator=gen).to(device))
            for _ in range(pool_size)
        ]
        self.position = 0  # batches handed out so far

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.pool[self.position % len(self.pool)]
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """{"position"}, or the file loaders' epoch form {"epoch", "step_in_epoch"} (a resume on
        another number of ranks restarts every loader at an epoch boundary that way)."""
        if "position" in state:
            self.position = int(state["position"])
        else:
            self.position = int(state["epoch"]) * self.steps_per_epoch + int(state["step_in_epoch"])


def build_loader(cfg: Config, rank: int, world_size: int, device: torch.device) -> Any:
    """Pick the loader named by data.source / data.loader."""
    if cfg.data.source == "synthetic":
        return SyntheticSource(cfg, rank, world_size, device)
    if cfg.data.loader == "torch":
        from .data_torch import TorchLoader

        return TorchLoader(cfg, rank, world_size, device)
    try:
        from pipelines_dali.loader import DaliTrainLoader
    except ImportError as e:  # DALI missing: say what to do instead of a bare traceback
        raise RuntimeError(f"data.loader=dali needs NVIDIA DALI ({e}); install nvidia-dali-cuda130 "
                           "or use data.loader=torch") from None
    return DaliTrainLoader(cfg, rank, world_size, device)
