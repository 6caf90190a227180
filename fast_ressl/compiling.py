"""torch.compile of the networks (model.compile, model.compile_mode) and whether CUDA graphs ran.

model.compile_mode is torch.compile's `mode`. `reduce-overhead` (and `max-autotune`) capture each
compiled graph (the student's forward, its backward, the teacher's forward) as a CUDA graph: one
launch replays hundreds of kernels, which is what a launch-bound step (small backbones, small
per-GPU batches) needs. Two things the loop (train.Loop) must do for that, with the helpers here:

- mark each training step's start (`torch.compiler.cudagraph_mark_step_begin`): inductor reuses a
  graph's output memory on the next replay, and without the mark it cannot tell the teacher's
  forward of this step from a new step while the student's backward is pending;
- say when a graph did NOT become a CUDA graph. Inductor then runs it without one and only notes
  why in a logger that is off by default, so `reduce-overhead` would silently be `default`. Its
  skip counter (`counters["inductor"]["cudagraph_skips"]`) and its messages are collected here.

Every torch.compile here (these networks, and the relation loss: method.compile_loss, on by default)
builds native code at run time, with tools that are not Python packages: `toolchain_problem` says
before the first step what is missing, instead of a compiler error inside the first step's trace.
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import List, Mapping, Optional

import torch

CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


def _skip_loggers() -> List[logging.Logger]:
    """The logger(s) inductor's log_cudagraph_skip_and_bump_counter writes to: an artifact logger of
    torch/_inductor/cudagraph_utils.py, off by default (no handler of its own), named `cudagraphs_log`
    in torch 2.14 and `perf_hint_log` in older releases; whichever this torch has."""
    try:
        import torch._inductor.cudagraph_utils as cu
    except ImportError:  # no inductor: nothing compiles with CUDA graphs either
        return []
    return [lg for lg in (getattr(cu, "cudagraphs_log", None), getattr(cu, "perf_hint_log", None))
            if isinstance(lg, logging.Logger)]


def _python_include() -> Path:
    """The folder Triton takes Python.h from (triton/runtime/build.py: the default sysconfig scheme,
    with Debian's `posix_local` read as `posix_prefix`). In a virtualenv it is the base Python's."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return Path(sysconfig.get_paths(scheme=scheme)["include"])


def toolchain_problem(device_type: str, environ: Optional[Mapping[str, str]] = None,
                      python_include: Optional[Path] = None) -> Optional[str]:
    """What torch.compile lacks on this machine to build code for `device_type`, or None.

    - cuda: inductor's kernels are Triton kernels, and Triton builds each kernel's launcher (and
      its driver utilities, once) as a Python extension with the host C compiler ($CC, else gcc,
      else clang on PATH) against Python.h (triton/runtime/build.py). A CUDA base image or a slim
      Python image has neither, and the first compiled call then fails with "Failed to find C
      compiler" or "Python.h: No such file or directory".
    - cpu: inductor writes C++ kernels and builds them with $CXX, else g++ (its default
      torch._inductor.config.cpp.cxx on Linux; clang++ on macOS), each with Python bindings, so
      against Python.h too (torch/_inductor/codecache.py, CppPythonBindingsCodeCache).

    `environ` and `python_include` default to this process's (os.environ, _python_include()).
    """
    env = os.environ if environ is None else environ
    path = env.get("PATH", "")
    missing: List[str] = []
    if device_type == "cuda":
        cc = env.get("CC")
        if cc:
            if shutil.which(cc, path=path) is None:
                missing.append(f"the C compiler CC={cc}")
        elif shutil.which("gcc", path=path) is None and shutil.which("clang", path=path) is None:
            missing.append("a C compiler (gcc or clang on PATH, or $CC)")
        need, packages = "Triton builds its kernel launchers with them", "gcc python3-dev"
    else:
        cxx = env.get("CXX")
        if cxx and shutil.which(cxx, path=path) is None:
            missing.append(f"the C++ compiler CXX={cxx}")
        elif not cxx and shutil.which("clang++" if sys.platform == "darwin" else "g++", path=path) is None:
            missing.append("a C++ compiler (g++ on PATH, or $CXX)")
        need, packages = "inductor builds its CPU kernels with them", "g++ python3-dev"
    header = (python_include or _python_include()) / "Python.h"
    if not header.is_file():
        missing.append(f"Python's headers ({header})")
    if not missing:
        return None
    return (f"torch.compile on {device_type} needs {' and '.join(missing)}, missing here ({need}); "
            f"on Debian/Ubuntu: apt-get install {packages}")


@functools.lru_cache(maxsize=None)
def toolchain_problem_here(device_type: str) -> Optional[str]:
    """toolchain_problem for this process's environment, looked up once per device type."""
    return toolchain_problem(device_type)


def compile_network(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """torch.compile(module) with torch.compile's `mode` (model.compile_mode)."""
    return torch.compile(module, mode=None if mode == "default" else mode)


def wants_cudagraphs(compile_: bool, mode: str, device: torch.device) -> bool:
    """True when the networks are compiled in a mode that captures CUDA graphs on a CUDA device."""
    return compile_ and mode in CUDAGRAPH_MODES and device.type == "cuda"


def _skip_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class CudagraphSkips(logging.Handler):
    """While installed (`start`..`stop`; stopped, it keeps its figures): how many compiled graphs
    inductor ran without a CUDA graph (`count`, from its counter) and its reasons (`reasons`, the
    first line of each message, distinct)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.reasons: List[str] = []
        self._base = 0
        self._final: int | None = None  # the count when stopped
        self._loggers = _skip_loggers()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().strip()
        first = msg.splitlines()[0] if msg else ""
        if "cudagraph" in first and ("skip" in first or "disabl" in first):  # not "enabling ..." notes,
            # nor the other perf hints older releases write to the same logger
            if first not in self.reasons:
                self.reasons.append(first[:300])

    def start(self) -> "CudagraphSkips":
        self._base, self._final = _skip_count(), None
        for lg in self._loggers:
            if self not in lg.handlers:
                lg.addHandler(self)
        return self

    def stop(self) -> None:
        """Detach; `count` and `reasons` keep what was seen until now."""
        for lg in self._loggers:
            lg.removeHandler(self)
        if self._final is None:
            self._final = _skip_count() - self._base

    @property
    def count(self) -> int:
        return self._final if self._final is not None else _skip_count() - self._base

    def report(self) -> dict:
        return {"graphs_without_cudagraphs": self.count, "reasons": list(self.reasons)}
