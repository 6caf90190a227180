"""benchmarks/gpu_carry.sh (pack, here) and benchmarks/gpu_install.py (unpack, on the GPU machine),
end to end on made-up wheels: parts that fit a device call, only the target Python's extension
modules, the parts found where the calls leave them, a damaged or missing part named."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "benchmarks" / "gpu_carry.sh"
INSTALL = REPO / "benchmarks" / "gpu_install.py"

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in ("xz", "unzip", "split", "sha256sum")),
                                reason="gpu_carry.sh needs xz, unzip, split and sha256sum")


def _wheel(path: Path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("carrydemo/__init__.py", "__version__ = '1.0'\n")
        z.writestr("carrydemo/blob.bin", payload)
        z.writestr("carrydemo/_ext.cpython-311-x86_64-linux-gnu.so", b"not for 3.12")
        z.writestr("carrydemo/_ext.cpython-312-x86_64-linux-gnu.so", b"for 3.12")
        z.writestr("carrydemo-1.0.dist-info/METADATA", "Name: carrydemo\nVersion: 1.0\n")
        z.writestr("carrydemo-1.0.data/scripts/carrydemo-tool", "#!/bin/sh\n")


def _pack(tmp_path: Path) -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # 1.5 MiB of incompressible bytes: two parts of at most 1 MiB
    _wheel(wheels / "carrydemo-1.0-py3-none-any.whl", os.urandom(3 << 19))
    out = tmp_path / "carry"
    q = subprocess.run(["bash", str(PACK), "--wheels", str(wheels), "--python", "3.12", "--out", str(out),
                        "--part-mib", "1", "--level", "1"], capture_output=True, text=True, timeout=120)
    assert q.returncode == 0, q.stdout + q.stderr
    assert "Carry them one per call" in q.stdout
    return out


def _install(sums: Path, parts_dir: Path, target: Path, *more: str):
    return subprocess.run([sys.executable, str(INSTALL), "--sums", str(sums), "--parts-dir", str(parts_dir),
                           "--target", str(target), "--check", "carrydemo", *more],
                          capture_output=True, text=True, timeout=120)


def test_pack_then_install_as_the_calls_leave_the_parts(tmp_path):
    out = _pack(tmp_path)
    parts = sorted(out.glob("part-*"))
    assert [p.name for p in parts] == ["part-00", "part-01"]
    assert all(p.stat().st_size <= 1 << 20 for p in parts)
    assert "python 3.12 (cpython-312)" in (out / "MANIFEST").read_text()
    # earlier calls copied part-00 to the parts folder; the last call carries part-01 with SHA256SUMS
    copied = tmp_path / "dali-parts"
    copied.mkdir()
    shutil.move(str(parts[0]), copied / "part-00")
    target = tmp_path / "site"
    q = _install(out / "SHA256SUMS", copied, target)
    assert q.returncode == 0, q.stdout + q.stderr
    assert "2 parts" in q.stdout and "carrydemo 1.0" in q.stdout
    pkg = target / "carrydemo"
    assert (pkg / "_ext.cpython-312-x86_64-linux-gnu.so").read_bytes() == b"for 3.12"
    assert not (pkg / "_ext.cpython-311-x86_64-linux-gnu.so").exists()  # other Pythons' modules dropped
    assert not (target / "carrydemo-1.0.data").exists() and (target / "carrydemo-1.0.dist-info").is_dir()
    assert (pkg / "blob.bin").stat().st_size == 3 << 19
    again = _install(out / "SHA256SUMS", copied, target)
    assert again.returncode == 0 and "already unpacked" in again.stdout


def test_a_target_that_cannot_be_written_falls_back(tmp_path):
    """Whether the GPU image's site-packages is writable has not been seen: where it is not, the
    carry goes to the fallback folder, said so, and imports from there; a second call finds it.
    The unwritable target is a folder under a plain file (this runs as root, which no mode bits
    stop), the same OSError path as a read-only mount."""
    out = _pack(tmp_path)
    (tmp_path / "plain").write_text("a file, not a folder")
    target, fallback = tmp_path / "plain" / "site", tmp_path / "fallback"
    q = _install(out / "SHA256SUMS", tmp_path / "nowhere", target, "--fallback", str(fallback))
    assert q.returncode == 0, q.stdout + q.stderr
    assert f"cannot write to {target}" in q.stdout and f"unpacking into {fallback} instead" in q.stdout
    assert "carrydemo 1.0" in q.stdout and f"unpacked into {fallback} (put it on PYTHONPATH" in q.stdout
    assert (fallback / "carrydemo" / "blob.bin").stat().st_size == 3 << 19
    again = _install(out / "SHA256SUMS", tmp_path / "nowhere", target, "--fallback", str(fallback))
    assert again.returncode == 0 and f"already unpacked into {fallback}" in again.stdout
    q = _install(out / "SHA256SUMS", tmp_path / "nowhere", target, "--fallback", str(tmp_path / "plain" / "fb"))
    assert q.returncode == 2 and "cannot write to" in q.stderr and "either" in q.stderr


def test_damaged_or_missing_part_is_named_and_nothing_is_unpacked(tmp_path):
    out = _pack(tmp_path)
    part = out / "part-00"
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    target = tmp_path / "site"
    q = _install(out / "SHA256SUMS", tmp_path / "nowhere", target)
    assert q.returncode == 2
    assert "part-00 is damaged" in q.stderr and "carry it again" in q.stderr
    assert not target.exists()
    (out / "part-01").unlink()
    q = _install(out / "SHA256SUMS", tmp_path / "nowhere", target)
    assert q.returncode == 2 and "part-01 is missing" in q.stderr


def test_pack_refuses_bad_options(tmp_path):
    q = subprocess.run(["bash", str(PACK), "--python", "twelve"], capture_output=True, text=True)
    assert q.returncode == 2 and "--python wants X.Y" in q.stderr
    q = subprocess.run(["bash", str(PACK), "--bogus"], capture_output=True, text=True)
    assert q.returncode == 2 and "unknown option '--bogus'" in q.stderr
