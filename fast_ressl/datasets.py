"""Image-file datasets shared by both loaders (DALI-free): listing, bad-file scan, denylist, checks.

A dataset is a flat list of image files with integer labels. Three sources list files:

- `folder`: ImageNet-style class folders (`root/<class>/<file>`); classes sorted by name -> label
  0..C-1; files whose name ends in an image extension (case-insensitive) are taken, recursively.
- `filelist`: `path label` lines; relative paths are resolved against `data.root` if set, otherwise
  against the list file's folder. Blank lines and `#` comments are skipped.
- `embedded`: the folder source on the materialised demo dataset (`fast_ressl.embedded`).

Bad files. A corrupt JPEG makes DALI's decoder fail the whole batch, so every file is fully decoded
once (`scan_files`, parallel threads; PIL releases the GIL while decoding) and the failures are
written to a denylist (JSON, beside the data if writable, else in ~/.cache/fast_ressl). Training reads
it and skips the listed files; without one it runs the scan first. Odd-but-valid files (CMYK or
grayscale JPEG, a PNG named .JPEG, an EXIF-rotated JPEG) decode fine and are kept: both loaders
decode to 3-channel RGB with the EXIF orientation applied. Truncated, zero-byte and non-image files
are listed with a reason. `prepare_dataset` raises `DataError` naming the path for an unreadable
folder, a class folder with nothing decodable, or a bad share over `data.max_bad_fraction`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .locks import exclusive, write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm")
# Formats both loaders decode (DALI's CPU/GPU decoders and PIL). Anything else is reported as bad.
DECODABLE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM", "MPO")
DENYLIST_NAME = ".fast_ressl_denylist.json"
DENYLIST_VERSION = 1


class DataError(RuntimeError):
    """A dataset problem found before training; the message names the path."""


@dataclass
class FileDataset:
    """Image files and labels. `bad_files` are the paths skipped (from the denylist scan)."""

    files: List[str]
    labels: List[int]
    classes: List[str] = field(default_factory=list)
    root: str = ""
    bad_files: List[str] = field(default_factory=list)
    bad_reasons: Dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.files)

    def block(self, rank: int, world_size: int) -> "FileDataset":
        """Rank `rank`'s contiguous block of the files, n*r//w to n*(r+1)//w, in order: the blocks are
        disjoint, cover every file in rank order and differ in size by one at most (the split of the
        eval passes; DALI's sharded reader makes the same)."""
        n = len(self.files)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        return FileDataset(self.files[lo:hi], self.labels[lo:hi], self.classes, self.root, self.bad_files,
                           self.bad_reasons)

    def without(self, paths) -> "FileDataset":
        """The same files, in the same order, less `paths` (found bad after the scan)."""
        gone = set(paths)
        keep = [i for i, p in enumerate(self.files) if p not in gone]
        return FileDataset([self.files[i] for i in keep], [self.labels[i] for i in keep], self.classes,
                           self.root, self.bad_files, self.bad_reasons)


def report_left_out(path: str, reason: str, rank: int) -> None:
    """One line on stderr for a file an eval pass met bad (gone bad since the scan, or one the
    loader's decoder cannot decode) and leaves out, instead of ending the pass."""
    print(f"fast-ressl: rank {rank}: {path} failed to decode in the eval pass ({reason}); left out of "
          "it; `fast-ressl scan` refreshes the denylist", file=sys.stderr)


# ----------------------------------------------------------------------------- listing
def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_files(folder: str, seen: Optional[Dict[Tuple[int, int], str]] = None) -> List[str]:
    """All image files under `folder` (recursive, sorted); an unreadable folder raises DataError.

    Symlinked folders are followed (data staged as links is common) but every real folder is read
    once: a folder reached a second time (a symlink loop, or a class folder linked to another) is a
    DataError naming both paths, instead of a hang or images silently counted twice."""
    seen = {} if seen is None else seen
    try:
        st = os.stat(folder)
    except OSError as e:
        raise DataError(f"cannot read folder {folder}: {e.strerror or e}") from None
    first = seen.setdefault((st.st_dev, st.st_ino), folder)
    if first != folder:
        kind = "a symlink loop" if os.path.commonpath([first, folder]) == first else "the same folder twice"
        raise DataError(f"{folder} is {first} again ({kind}): its images would be read twice; remove the "
                        "symlink or point it elsewhere")
    out: List[str] = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"cannot read folder {folder}: {e.strerror or e}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=True):
            out.extend(_walk_files(entry.path, seen))
        elif _is_image_name(entry.name):
            out.append(entry.path)
    return out


def list_folder(root: str | os.PathLike) -> FileDataset:
    """ImageNet-style class folders under `root`; label = index of the class name in sorted order."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise DataError(f"data.root {root} is not a directory")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read folder {root}: {e.strerror or e}") from None
    if not classes:
        raise DataError(f"{root} has no class folders (expected root/<class>/<image>)")
    files: List[str] = []
    labels: List[int] = []
    seen: Dict[Tuple[int, int], str] = {}
    st = os.stat(root)
    seen[(st.st_dev, st.st_ino)] = root
    for label, name in enumerate(classes):
        class_files = _walk_files(os.path.join(root, name), seen)
        files.extend(class_files)
        labels.extend([label] * len(class_files))
    return FileDataset(files=files, labels=labels, classes=classes, root=root)


def list_filelist(file_list: str | os.PathLike, base: Optional[str] = None) -> FileDataset:
    """`path label` lines (the label is the last whitespace-separated field, so paths may hold spaces)."""
    file_list = os.path.abspath(os.fspath(file_list))
    base = os.path.abspath(base) if base else os.path.dirname(file_list)
    try:
        lines = Path(file_list).read_text().splitlines()
    except OSError as e:
        raise DataError(f"cannot read data.file_list {file_list}: {e.strerror or e}") from None
    files: List[str] = []
    labels: List[int] = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        try:
            path, label = parts[0], int(parts[1])
        except (IndexError, ValueError):
            raise DataError(f"{file_list}:{n}: expected `path label`, got {line!r}") from None
        if label < 0:
            raise DataError(f"{file_list}:{n}: negative label {label}")
        files.append(path if os.path.isabs(path) else os.path.join(base, path))
        labels.append(label)
    if not files:
        raise DataError(f"data.file_list {file_list} lists no files")
    classes = [str(i) for i in range(max(labels) + 1)]
    return FileDataset(files=files, labels=labels, classes=classes, root=base)


def list_source(cfg) -> FileDataset:
    """The file list of `cfg.data` (a `fast_ressl.config.Config`) for source folder/filelist/embedded."""
    d = cfg.data
    if d.source == "embedded":
        from .embedded import ensure_embedded

        return list_folder(ensure_embedded(d.embedded_dir)["train"])
    if d.source == "folder":
        return list_folder(d.root)
    if d.source == "filelist":
        return list_filelist(d.file_list, d.root)
    raise DataError(f"data.source={d.source} has no file listing")


def dataset_identity(ds: FileDataset) -> dict:
    """What a run's epochs are drawn from: the good files' count, a hash of their paths relative to
    the root, and the count per class folder (to name what changed at a resume)."""
    rel = [os.path.relpath(f, ds.root) if ds.root else f for f in ds.files]
    per_class: Dict[str, int] = {}
    for label in ds.labels:
        name = ds.classes[label] if ds.classes else str(label)
        per_class[name] = per_class.get(name, 0) + 1
    return {"num_files": len(rel), "sha256": hashlib.sha256("\n".join(rel).encode()).hexdigest(),
            "per_class": per_class, "root": ds.root}


def epoch_block(n: int, seed: int, epoch: int, rank: int, per_rank: int) -> List[int]:
    """Indices rank `rank` reads in `epoch`, in order: the rank-th block of `per_rank` indices of a
    full permutation of range(n) seeded by (seed, epoch). Blocks of different ranks are disjoint; the
    indices past world * per_rank (less than one global batch) are dropped for this epoch."""
    import numpy as np

    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[rank * per_rank:(rank + 1) * per_rank].tolist()


# ----------------------------------------------------------------------------- scanning
def check_image(path: str) -> Optional[str]:
    """Fully decode one file; None if it is a usable image, else the reason it is bad."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if size == 0:
        return "zero-byte file"
    return check_image_source(path)


def check_image_bytes(data: bytes) -> Optional[str]:
    """`check_image` for an in-memory encoded image (e.g. a tar member)."""
    import io

    if not data:
        return "zero-byte file"
    return check_image_source(io.BytesIO(data))


def check_image_source(src) -> Optional[str]:
    """Fully decode a path or file object; None if usable, else the reason."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data", harmless
            with Image.open(src) as img:
                fmt = img.format
                if fmt not in DECODABLE_FORMATS:
                    return f"unsupported image format {fmt}"
                img.load()  # the full decode: a truncated file raises here
                if img.width < 1 or img.height < 1:
                    return "empty image"
    except UnidentifiedImageError:
        return "not an image"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        msg = str(e) or type(e).__name__
        return ("truncated: " if "truncated" in msg.lower() else "cannot decode: ") + msg
    return None


def scan_files(paths: Sequence[str], num_threads: int = 4, progress: bool = True,
               desc: str = "scanning images") -> Dict[str, str]:
    """Decode every file in parallel; returns {path: reason} for the bad ones.

    progress: a rich progress bar on stderr (plain periodic lines when not a terminal).
    """
    bad: Dict[str, str] = {}
    n = len(paths)
    if n == 0:
        return bad
    def chunked(pool, chunk: int = 4096):  # bounded number of pending futures (ImageNet: 1.3M files)
        for i in range(0, n, chunk):
            yield from pool.map(check_image, paths[i:i + chunk])

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        results = chunked(pool)
        if progress:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn)
            from rich.console import Console

            console = Console(file=sys.stderr)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=console, transient=False) as bar:
                task = bar.add_task(desc, total=n)
                for i, (path, reason) in enumerate(zip(paths, results)):
                    if reason is not None:
                        bad[path] = reason
                    if i % 64 == 63 or i == n - 1:
                        bar.update(task, completed=i + 1)
        else:
            for path, reason in zip(paths, results):
                if reason is not None:
                    bad[path] = reason
    return bad


# ----------------------------------------------------------------------------- denylist
def default_denylist_path(dataset_root: str, key: str) -> str:
    """Beside the data if that folder is writable, else ~/.cache/fast_ressl/denylist-<hash>.json.

    key identifies the dataset (the folder root or the file list path).
    """
    if os.path.isdir(dataset_root) and os.access(dataset_root, os.W_OK):
        if os.path.isfile(key):  # a file list: <list>.denylist.json beside it
            return key + ".denylist.json"
        return os.path.join(dataset_root, DENYLIST_NAME)
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    digest = hashlib.sha256(os.path.abspath(key).encode()).hexdigest()[:16]
    return os.path.join(cache, "fast_ressl", f"denylist-{digest}.json")


def write_denylist(path: str, num_files: int, bad: Dict[str, str], root: str) -> None:
    """Atomic write; paths are stored relative to root where possible."""
    def rel(p: str) -> str:
        r = os.path.relpath(p, root)
        return p if r.startswith("..") else r

    data = {"version": DENYLIST_VERSION, "root": root, "num_files": num_files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "bad": [{"path": rel(p), "reason": bad[p]} for p in sorted(bad)]}
    write_atomic(path, json.dumps(data, indent=1))  # readable by the dataset's other users (not 0600)


def read_denylist(path: str, root: Optional[str] = None) -> Tuple[int, Dict[str, str]]:
    """(number of files when scanned, {absolute path: reason}).

    Entries are stored relative to the data root and resolved against `root`, the root of the data
    being read now (the stored root only when none is given): a dataset copied or moved with its
    denylist (`cp -r` to local disk) keeps its known-bad files out. A corrupt file is a DataError
    that names it."""
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != DENYLIST_VERSION:
            raise DataError(f"denylist {path} has an unknown format; delete it to rescan")
        base = root if root is not None else data.get("root", "")
        bad = {os.path.normpath(os.path.join(base, e["path"])): e["reason"] for e in data["bad"]}
        return int(data["num_files"]), bad
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"denylist {path} is corrupt ({type(e).__name__}: {e}); delete it to rescan") from None


def scan_dataset(ds: FileDataset, denylist: str, num_threads: int = 4, progress: bool = True) -> Dict[str, str]:
    """Scan all files of `ds` and write the denylist; returns {path: reason}."""
    bad = scan_files(ds.files, num_threads=num_threads, progress=progress)
    write_denylist(denylist, len(ds.files), bad, ds.root)
    return bad


# how long a rank waits for another's data preparation (a denylist scan of a large dataset)
PREPARE_TIMEOUT_S = 6 * 3600


def _wait_for(path: str, num_files: int, root: str, timeout_s: float = PREPARE_TIMEOUT_S) -> Dict[str, str]:
    """A machine's other ranks: wait until its first rank has written a denylist for `num_files`
    files; return it."""
    t0 = time.time()
    while True:
        try:
            bad = _current_denylist(path, num_files, root)
            if bad is not None:
                return bad
        except (OSError, DataError):  # being written: try again
            pass
        if time.time() - t0 > timeout_s:
            raise DataError(f"timed out waiting for this machine's first rank to write the denylist {path}")
        time.sleep(1.0)


def apply_denylist(ds: FileDataset, bad: Dict[str, str], max_bad_fraction: float,
                   where: str = "") -> FileDataset:
    """Drop the bad files; check class folders and the bad share. Raises DataError naming the path."""
    norm_bad = {os.path.normpath(p): r for p, r in bad.items()}
    keep_files: List[str] = []
    keep_labels: List[int] = []
    dropped: List[str] = []
    reasons: Dict[str, str] = {}
    for path, label in zip(ds.files, ds.labels):
        reason = norm_bad.get(os.path.normpath(path))
        if reason is None:
            keep_files.append(path)
            keep_labels.append(label)
        else:
            dropped.append(path)
            reasons[path] = reason
    total = len(ds.files)
    if total == 0:
        raise DataError(f"{ds.root or where}: no image files found")
    if ds.classes:
        present = set(keep_labels)
        for label, name in enumerate(ds.classes):
            if label not in present:
                folder = os.path.join(ds.root, name) if os.path.isdir(os.path.join(ds.root, name)) else None
                what = f"class folder {folder}" if folder else f"class {label} of {ds.root}"
                raise DataError(f"{what} has no decodable image")
    share = len(dropped) / total
    if share > max_bad_fraction:
        sample = ", ".join(dropped[:5])
        raise DataError(f"{ds.root or where}: {len(dropped)} of {total} files are bad ({share:.1%} > "
                        f"data.max_bad_fraction={max_bad_fraction}); e.g. {sample}")
    return FileDataset(files=keep_files, labels=keep_labels, classes=ds.classes, root=ds.root,
                       bad_files=dropped, bad_reasons=reasons)


def prepare_dataset(cfg, rank: int = 0, progress: bool = True) -> FileDataset:
    """List the source, read (or create by scanning) its denylist, drop and check the bad files.

    When no denylist (or a stale one: different file count) exists, the first rank on each machine
    (torchrun's LOCAL_RANK 0; `rank` without torchrun) scans and the machine's other ranks wait for
    the file: on several nodes the denylist may be on each node's own disk (a read-only dataset's goes
    to the cache folder), where a rank on another node would never see rank 0's. The scanners take
    turns on a lock beside it, so with a shared folder (and working locks) one node scans.
    `data.denylist` overrides the denylist location; `data.scan=false` skips it.
    """
    d = cfg.data
    ds = list_source(cfg)
    if not d.scan:
        return apply_denylist(ds, {}, d.max_bad_fraction)
    key = d.file_list if d.source == "filelist" else ds.root
    path = d.denylist or default_denylist_path(ds.root if d.source != "filelist" else
                                               os.path.dirname(os.path.abspath(d.file_list)), key)
    bad = _current_denylist(path, len(ds.files), ds.root)
    if bad is None:
        if first_on_machine(rank):
            with exclusive(path + ".lock", waiting=f"fast-ressl: waiting for another process scanning {key} "
                           f"(lock {path}.lock)" if progress else None):
                bad = _current_denylist(path, len(ds.files), ds.root)  # it may have written it meanwhile
                if bad is None:
                    if progress:
                        print(f"fast-ressl: no denylist for {key}; decoding all {len(ds.files)} files once "
                              f"(writes {path})", file=sys.stderr)
                    bad = scan_dataset(ds, path, num_threads=d.num_threads, progress=progress)
        else:
            bad = _wait_for(path, len(ds.files), ds.root)
    return apply_denylist(ds, bad, d.max_bad_fraction, where=key)


def first_on_machine(rank: int) -> bool:
    """Whether this process is its machine's first rank: torchrun's LOCAL_RANK 0 in a job of several
    processes (WORLD_SIZE > 1), else `rank` 0 (a LOCAL_RANK some other launcher left in the
    environment of a single process must not make it wait for a scan nobody runs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"]) == 0
    return rank == 0


def _current_denylist(path: str, num_files: int, root: str) -> Optional[Dict[str, str]]:
    """The denylist at `path` if it exists and was written for `num_files` files, else None."""
    if not os.path.exists(path):
        return None
    num, bad = read_denylist(path, root)
    return bad if num == num_files else None  # a different count: the dataset changed since the scan


def scan_command(data: str, output: Optional[str] = None, num_threads: int = 4,
                 progress: bool = True) -> int:
    """`fast-ressl scan DATA`: DATA is a class-folder root or a `path label` list file.

    Writes the denylist (default location as training uses) and prints a summary; returns the
    number of bad files.
    """
    if os.path.isdir(data):
        ds = list_folder(data)
        key = ds.root
        where = ds.root
    else:
        ds = list_filelist(data)
        key = os.path.abspath(data)
        where = os.path.dirname(key)
    path = output or default_denylist_path(where, key)
    bad = scan_dataset(ds, path, num_threads=num_threads, progress=progress)
    print(f"scanned {len(ds.files)} files in {len(ds.classes)} classes: {len(bad)} bad; denylist {path}")
    for p in sorted(bad):
        print(f"  {p}: {bad[p]}")
    return len(bad)


def pil_rgb(path: str):
    """Open an image as 3-channel RGB with the EXIF orientation applied (as DALI's decoder does)."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")



# ----------------------------------------------------------------------------- CLI
def _cmd_scan(args) -> int:
    try:
        n = scan_command(args.data, output=args.output, num_threads=args.threads,
                         progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if (args.fail_on_bad and n) else 0


def _cmd_wds_index(args) -> int:
    from pipelines_dali.webdataset import write_indexes  # DALI-free module

    try:
        bad = write_indexes(args.shards, num_threads=args.threads, progress=not args.quiet)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote index files in {args.shards}; {len(bad)} bad samples left out")
    for key in sorted(bad):
        print(f"  {key}: {bad[key]}")
    return 0


def add_cli_commands(sub) -> None:
    """Register `scan` and `wds-index` on the CLI's argparse subparsers."""
    threads = max(1, os.cpu_count() or 1)
    p = sub.add_parser("scan", help="decode every image once and write the bad-file denylist",
                       description="Fully decode every file of DATA (a class-folder root or a "
                       "`path label` list) in parallel and write the denylist that training reads "
                       "(default: beside the data, or ~/.cache/fast_ressl when not writable).")
    p.add_argument("data", help="class-folder root or file list")
    p.add_argument("--output", help="denylist path (default: where training looks)")
    p.add_argument("--threads", type=int, default=threads, help=f"decode threads (default {threads})")
    p.add_argument("--fail-on-bad", action="store_true", help="exit 1 if any file is bad")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_scan)
    p = sub.add_parser("wds-index", help="write DALI index files for webdataset shards",
                       description="Write <shard>.idx for every SHARDS/*.tar (DALI's wds2idx format); "
                       "samples whose image does not decode are left out and listed.")
    p.add_argument("shards", help="folder of .tar shards")
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_wds_index)
