"""Webdataset shards for DALI's reader: index files (with bad samples left out) and shard listing.

A shard dir holds `*.tar` files; each sample is an image component (jpg/jpeg/png/webp/bmp) and a
`cls` component with the label as ASCII digits (the webdataset convention). DALI reads a shard
through an index file (`<shard>.idx`, the `wds2idx` v1.2 text format: a header `v1.2 <samples>`,
then per sample `ext offset size name` for each component). `write_indexes` writes them with
Python's tarfile and, while at it, fully decodes each image: a sample whose image is truncated,
empty or not an image is left out of the index (so DALI never reads it) and listed in
`<dir>/.fast_ressl_wds_denylist.json`. This module does not import DALI.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

from fast_ressl.datasets import DataError, check_image_bytes
from fast_ressl.locks import exclusive, write_atomic

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "JPEG", "JPG")
LABEL_EXTS = ("cls", "label")
DENYLIST = ".fast_ressl_wds_denylist.json"


def _split(name: str) -> Tuple[str, str]:
    """webdataset key/extension split: the extension starts at the first dot of the basename."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _index_one(tar_path: str) -> Tuple[List[str], Dict[str, str], int]:
    """(index lines of good samples, {"shard.tar:key": reason}, number of samples)."""
    samples: List[Tuple[str, List[Tuple[str, int, int, str]]]] = []
    with tarfile.open(tar_path) as tf:
        for m in tf:
            if not m.isreg():
                continue
            key, ext = _split(m.name)
            if not key or key.endswith("/") or os.path.basename(key).startswith("."):
                continue
            if not samples or samples[-1][0] != key:
                samples.append((key, []))
            samples[-1][1].append((ext, m.offset_data, m.size, m.name))
    lines, bad = [], {}
    with open(tar_path, "rb") as f:
        for key, comps in samples:
            img = [c for c in comps if c[0] in IMAGE_EXTS]
            lab = [c for c in comps if c[0] in LABEL_EXTS]
            where = f"{os.path.basename(tar_path)}:{key}"
            if not img or not lab:
                bad[where] = "missing image or cls component"
                continue
            if any(c[3] != "".join(c[3].split()) for c in comps):
                # the index format is whitespace-separated: such a name would shift every field of
                # its line and DALI would reject the whole index
                bad[where] = "a member name holds whitespace (DALI's index cannot name it); rename it"
                continue
            f.seek(img[0][1])
            reason = check_image_bytes(f.read(img[0][2]))
            if reason is not None:
                bad[where] = reason
                continue
            lines.append(" ".join(" ".join(map(str, c)) for c in comps))
    return lines, bad, len(samples)


def write_indexes(root: str, num_threads: int = 4, progress: bool = True) -> Dict[str, str]:
    """Write `<shard>.idx` for every `root/*.tar` (bad samples left out) and the denylist.

    Returns {"shard.tar:key": reason} of the left-out samples."""
    tars = sorted(glob.glob(os.path.join(root, "*.tar")))
    if not tars:
        raise DataError(f"no *.tar shards in {root}")
    all_bad: Dict[str, str] = {}
    total = 0
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        for i, (tar, (lines, bad, n)) in enumerate(zip(tars, pool.map(_index_one, tars))):
            write_atomic(tar[:-4] + ".idx", f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines))
            all_bad.update(bad)
            total += n
            if progress:
                print(f"indexed {i + 1}/{len(tars)} {os.path.basename(tar)}: {len(lines)} samples, "
                      f"{len(bad)} bad", file=sys.stderr)
    write_atomic(os.path.join(root, DENYLIST), json.dumps({"num_samples": total, "bad": all_bad}, indent=1))
    return all_bad


def list_shards(root: str, num_threads: int = 4, max_bad_fraction: float = 1.0,
                progress: bool = True) -> Tuple[List[str], List[str], int, Dict[str, str]]:
    """(tar paths, index paths, good samples, bad {shard:key: reason}); writes missing indexes."""
    tars = sorted(glob.glob(os.path.join(root, "*.tar")))
    if not tars:
        raise DataError(f"data.root {root}: no *.tar shards")
    idx = [t[:-4] + ".idx" for t in tars]
    deny = os.path.join(root, DENYLIST)

    def missing() -> bool:
        return not all(os.path.exists(p) for p in idx) or not os.path.exists(deny)

    if missing():  # every rank of a job gets here at once: one writes, the others wait, then read
        with exclusive(os.path.join(root, DENYLIST + ".lock"),
                       waiting=f"fast-ressl: waiting for another process writing the webdataset index files "
                       f"in {root}" if progress else None):
            if missing():
                if progress:
                    print(f"fast-ressl: writing webdataset index files in {root} (decodes every image once)",
                          file=sys.stderr)
                write_indexes(root, num_threads=num_threads, progress=progress)
    n = 0
    for p in idx:
        with open(p) as f:
            head = f.readline().split()
        if len(head) != 2 or not head[0].startswith("v1"):
            raise DataError(f"{p}: not a DALI webdataset index file")
        n += int(head[1])
    with open(deny) as f:
        data = json.load(f)
    bad = dict(data.get("bad", {}))
    total = int(data.get("num_samples", n + len(bad)))
    if total and len(bad) / total > max_bad_fraction:
        raise DataError(f"{root}: {len(bad)} of {total} webdataset samples are bad "
                        f"(> data.max_bad_fraction={max_bad_fraction}); see {deny}")
    return tars, idx, n, bad
