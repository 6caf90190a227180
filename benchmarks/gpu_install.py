"""Unpacks what benchmarks/gpu_carry.sh packed (DALI, its CUDA libraries, omegaconf) on the lent GPU
machine: checks every part against SHA256SUMS, streams the joined parts through xz into the Python's
site-packages (what pip would install there; the machine is discarded afterwards) and imports the
result. Standard library only: it runs before anything is installed.

    python3 benchmarks/gpu_install.py [--sums .device-carry/SHA256SUMS] [--parts-dir /tmp/dali-parts]
                                      [--target DIR] [--fallback DIR] [--check nvidia.dali,omegaconf]

Where the target cannot be written (a read-only image, another user's virtualenv: nobody has yet
seen whether the GPU image's /opt/torch/.venv is writable), the parts go to --fallback instead,
default /tmp/fast_ressl_site-pyX.Y (this Python's version), which must then be on PYTHONPATH:
benchmarks/gpu_check.py puts it there for every stage, and the last line printed says so.

A part is looked for beside SHA256SUMS first (the call that carries the last part carries it there),
then in --parts-dir (where earlier calls copied theirs). Exit status: 0 installed (or already
installed from the same SHA256SUMS), 2 a part missing or damaged (named, with what to redo), 1 the
import check failed after unpacking.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
MARKER = ".fast_ressl_carry"  # in the target: the SHA256SUMS digest it was unpacked from
# where the target is not writable; gpu_check puts it on PYTHONPATH. Named by Python version: the
# carry holds one version's extension modules, and another Python must not import them from there.
FALLBACK_TARGET = Path(f"/tmp/fast_ressl_site-py{sys.version_info[0]}.{sys.version_info[1]}")


class Joined(io.RawIOBase):
    """The parts read back to back as one stream (no joined copy on disk: the archive is ~175 MB)."""

    def __init__(self, paths: List[Path]):
        self._paths = list(paths)
        self._f = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        while True:
            if self._f is None:
                if not self._paths:
                    return 0
                self._f = open(self._paths.pop(0), "rb")
            n = self._f.readinto(buf)
            if n:
                return n
            self._f.close()
            self._f = None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(sums: Path) -> List[Tuple[str, str]]:
    """[(sha256, part name)] in order."""
    rows = []
    for line in sums.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            rows.append((digest, name.lstrip("*")))
    if not rows:
        raise ValueError(f"{sums} lists no parts")
    return rows


def find_parts(sums: Path, parts_dir: Path) -> Tuple[List[Path], List[str]]:
    """The parts' paths in order, and the problems (missing or damaged parts), each a sentence."""
    paths, problems = [], []
    for digest, name in read_sums(sums):
        where = [d / name for d in (sums.parent, parts_dir) if (d / name).is_file()]
        if not where:
            problems.append(f"{name} is missing (looked in {sums.parent} and {parts_dir}): carry it again "
                            f"and copy it to {parts_dir}")
            continue
        got = sha256(where[0])
        if got != digest:
            problems.append(f"{where[0]} is damaged (sha256 {got[:12]}..., SHA256SUMS says {digest[:12]}...): "
                            "carry it again")
            continue
        paths.append(where[0])
    return paths, problems


def check_imports(modules: List[str], target: Path) -> Tuple[bool, str]:
    """Import each module in a fresh interpreter that sees `target`; (ok, versions or the error)."""
    code = ("import importlib\nout = []\nfor m in %r:\n    mod = importlib.import_module(m)\n"
            "    out.append(f\"{m} {getattr(mod, '__version__', '?')}\")\nprint(', '.join(out))" % modules)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    q = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if q.returncode == 0:
        return True, q.stdout.strip()
    return False, (q.stderr.strip().splitlines() or ["?"])[-1]


def writable(folder: Path) -> Optional[str]:
    """None if files can be created in `folder` (made if missing), else why not. Tried, not read off
    the mode bits: root passes every permission check but not a read-only mount."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fast_ressl_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return None
    except OSError as e:
        return f"{e.strerror or e} ({type(e).__name__})"


def _already(target: Path, stamp: str, modules: List[str]) -> Optional[str]:
    """The import check's versions if `target` holds this carry and it imports, else None."""
    marker = target / MARKER
    if marker.is_file() and marker.read_text().strip() == stamp:
        ok, msg = check_imports(modules, target)
        if ok:
            return msg
    return None


def install(sums: Path, parts_dir: Path, target: Path, modules: List[str],
            fallback: Path = FALLBACK_TARGET) -> int:
    t0 = time.time()
    if not sums.is_file():
        print(f"gpu_install: {sums} not found: carry .device-carry/SHA256SUMS with this call "
              "(made by benchmarks/gpu_carry.sh)", file=sys.stderr)
        return 2
    stamp = sha256(sums)
    for where in (target, fallback):
        msg = _already(where, stamp, modules)
        if msg:
            print(f"gpu_install: already unpacked into {where}: {msg}")
            return 0
    paths, problems = find_parts(sums, parts_dir)
    if problems:
        for p in problems:
            print(f"gpu_install: {p}", file=sys.stderr)
        return 2
    why = writable(target)
    if why:
        print(f"gpu_install: cannot write to {target}: {why}; unpacking into {fallback} instead")
        target = fallback
        why = writable(target)
        if why:
            print(f"gpu_install: cannot write to {target} either: {why}; pass --fallback DIR", file=sys.stderr)
            return 2
    with tarfile.open(fileobj=io.BufferedReader(Joined(paths), 1 << 20), mode="r|xz") as tar:
        # 'tar' filter (Python >= 3.12): keeps the shared libraries' modes and in-tree symlinks,
        # refuses absolute paths and '..'.
        kwargs = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
        tar.extractall(target, **kwargs)
    (target / MARKER).write_text(stamp + "\n")
    ok, msg = check_imports(modules, target)
    size = sum(p.stat().st_size for p in paths)
    # one line, the last: gpu_check shows it as the stage's result
    where = f"{target} (put it on PYTHONPATH; benchmarks/gpu_check.py does)" if target == fallback else str(target)
    print(f"gpu_install: {len(paths)} parts ({size / 1e6:.0f} MB) unpacked into {where} in "
          f"{time.time() - t0:.1f} s: {msg}")
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_install.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sums", default=str(REPO / ".device-carry" / "SHA256SUMS"))
    p.add_argument("--parts-dir", default="/tmp/dali-parts")
    p.add_argument("--target", default=sysconfig.get_paths()["purelib"],
                   help="where to unpack (default this Python's site-packages)")
    p.add_argument("--fallback", default=str(FALLBACK_TARGET),
                   help="where to unpack if the target cannot be written (then put it on PYTHONPATH)")
    p.add_argument("--check", default="nvidia.dali,omegaconf", help="modules to import afterwards")
    a = p.parse_args(argv)
    return install(Path(a.sums), Path(a.parts_dir), Path(a.target), [m for m in a.check.split(",") if m],
                   Path(a.fallback))


if __name__ == "__main__":
    sys.exit(main())
