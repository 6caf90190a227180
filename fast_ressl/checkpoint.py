"""Checkpoints: atomic writes and safe loading (no code ever runs from a checkpoint file)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over `path`.

    A crash or kill at any moment leaves either the old file or the complete new one, never a
    partial file under the final name (rename is atomic within one POSIX filesystem).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """torch.load with weights_only=True: only tensors and plain containers/scalars are accepted,
    so a pickle carrying a payload is refused before anything in it runs."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for payloads, RuntimeError/EOFError for truncation
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return obj


class CheckpointError(RuntimeError):
    pass


REQUIRED_KEYS = ("student", "teacher", "queue", "optimizer", "scaler", "step", "config",
                 "config_hash", "loader", "rng")


def check_complete(state: dict, path: str | os.PathLike) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks key(s): {', '.join(missing)}")
