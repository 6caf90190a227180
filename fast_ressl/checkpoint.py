"""Checkpoints: atomic writes and safe loading (no code ever runs from a checkpoint file)."""
from __future__ import annotations

import errno
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

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


# The explicit allow-list for torch.load(weights_only=True): our checkpoints hold only tensors,
# dicts, lists, tuples, str, int, float, bool and None (configs are stored as plain dicts, RNG states
# as tensors and lists), so no class beyond torch's weights-only built-ins is allowed.
ALLOWED_GLOBALS: list = []


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """torch.load with weights_only=True: only tensors and plain containers/scalars are accepted,
    so a pickle carrying a payload is refused before anything in it runs."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS), warnings.catch_warnings():
            # a raw pickle (not torch.save's zip: no file fast_ressl wrote) made torch warn about its
            # protocol before the refusal below, which already names the file and the reason
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError for payloads, RuntimeError/EOFError for truncation
        raise CheckpointError(f"cannot load checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a dict")
    return obj


class CheckpointError(RuntimeError):
    pass


REQUIRED_KEYS = ("student", "teacher", "queue", "optimizer", "scaler", "step", "skipped_steps",
                 "ranks", "world_size", "bad_files", "config", "config_hash")


def check_complete(state: dict, path: str | os.PathLike) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks key(s): {', '.join(missing)}")


def _step_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


class CheckpointDir:
    """`step_XXXXXXXX.pt` every checkpoint, `last.pt` a hard link to the newest, the newest
    `keep` numbered files kept. Writes are atomic; loading falls back past unreadable files."""

    def __init__(self, root: Path, keep: int = 3, warn=print):
        self.root, self.keep, self.warn = Path(root), keep, warn

    @property
    def last(self) -> Path:
        return self.root / "last.pt"

    def remove_orphans(self) -> list[Path]:
        """Delete temporary files a killed writer left (`.step_*.pt.*.tmp` from atomic_save, the
        `.last.*.tmp` hard link): each can be checkpoint-sized. Call it only while holding the run
        directory's lock (RunLock), so no live writer's file is touched. Returns the removed paths."""
        removed = []
        for tmp in list(self.root.glob(".step_*.pt.*.tmp")) + list(self.root.glob(".last.*.tmp")):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
        return removed

    def numbered(self) -> list[Path]:
        return sorted(self.root.glob("step_*.pt"), key=_step_of, reverse=True)

    def save(self, state: dict, step: int) -> Path:
        path = self.root / f"step_{step:08d}.pt"
        atomic_save(state, path)
        tmp = self.root / f".last.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)  # no second copy of the bytes; rename makes `last` switch atomically
        except OSError:  # filesystems without hard links: a second atomic write
            atomic_save(state, self.last)
        else:
            os.replace(tmp, self.last)
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.numbered()[self.keep:]:
            try:
                old.unlink()
            except OSError as e:  # a failed delete must never stop training
                self.warn(f"warning: could not delete old checkpoint {old}: {e}")

    def set_aside_unusable(self, resumed_step: Optional[int]) -> list[Path]:
        """After a resume from `resumed_step` (None: no checkpoint was usable), every numbered
        checkpoint newer than it is one that was skipped as unusable: rename each to NAME.unusable
        (kept for inspection, out of the rotation) and point last.pt at the resumed one again. Left
        in place, an unusable step_120 sorted newest and held one of the `keep` places until the run
        reached step 120 again, while the good checkpoints were deleted around it (found by a README
        walkthrough). Call it on the writing rank only, holding the run directory's lock."""
        moved = []
        for path in self.numbered():
            if resumed_step is None or _step_of(path) > resumed_step:
                dest = path.with_name(path.name + ".unusable")
                try:
                    os.replace(path, dest)
                except OSError as e:
                    self.warn(f"warning: could not set aside unusable checkpoint {path}: {e}")
                    continue
                moved.append(dest)
        if moved:
            self.last.unlink(missing_ok=True)
            if resumed_step is not None:
                resumed = self.root / f"step_{resumed_step:08d}.pt"
                tmp = self.root / f".last.{os.getpid()}.tmp"
                try:
                    os.link(resumed, tmp)
                    os.replace(tmp, self.last)
                except OSError:  # no hard links, or the numbered file is gone: the next save writes it
                    tmp.unlink(missing_ok=True)
        return moved

    def load_newest_valid(self, map_location: Any = "cpu") -> tuple[Optional[dict], Optional[Path]]:
        """The newest checkpoint that loads and is complete; each one skipped is reported."""
        seen: set = set()
        candidates = ([self.last] if self.last.exists() else []) + self.numbered()
        for path in candidates:
            ino = path.stat().st_ino
            if ino in seen:
                continue
            seen.add(ino)
            try:
                state = safe_load(path, map_location)
                check_complete(state, path)
            except CheckpointError as e:
                self.warn(f"warning: skipping unusable checkpoint: {e}")
                continue
            return state, path
        return None, None


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


# Descriptors of the run locks this process holds, closed in every forked child (below).
_HELD_LOCK_FDS: set = set()


def _drop_locks_in_forked_child() -> None:
    """A flock belongs to the open file description, and fork shares it: a forked child (a torch
    DataLoader worker) would hold the run's lock too. Such workers outlive a kill -9 of their parent
    until their watchdog notices, up to torch's MP_STATUS_CHECK_INTERVAL (5 s), so an immediate
    relaunch (torchrun --max-restarts, a job scheduler) was refused as "in use" by the dead run
    (seen in gpu_check's CPU rehearsal with data.loader=torch). Closing the child's copy of the
    descriptor leaves the parent's lock held; flock(LOCK_UN) here would drop it for the parent too."""
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_forked_child)


class RunLock:
    """One writer per run directory: an exclusive `flock` on RUN_DIR/.lock, held while training.

    The kernel releases a flock when the last descriptor of it closes: when its process dies
    (kill -9 included), as forked children close their copies at fork (_drop_locks_in_forked_child)
    and exec'd ones never get one (os.open's descriptors are close-on-exec), so a stale lock never
    blocks the relaunch. The file keeps the holder's pid and host for the message."""

    def __init__(self, run_dir: Path):
        import fcntl
        import socket

        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                # ENOLCK/EOPNOTSUPP/ENOSYS: a filesystem without flock (Lustre mounted noflock, NFS
                # without its lock daemon) is not a busy run directory; it was reported as one,
                # naming the last run's pid, and no run could start there (found in review)
                os.close(self.fd)
                self.fd = -1
                print(f"fast-ressl: warning: cannot lock {self.path} ({err.strerror}): this filesystem does "
                      "not support flock; running without the lock, so nothing stops a second run from "
                      "writing the same run directory", file=sys.stderr)
                return
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RunDirBusy(f"{run_dir} is in use by another fast-ressl process ({holder}); wait for it "
                             "to finish or stop it, or use another run.name / run.dir") from None
        _HELD_LOCK_FDS.add(self.fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            _HELD_LOCK_FDS.discard(self.fd)
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = -1
