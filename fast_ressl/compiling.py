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
"""
from __future__ import annotations

import logging
from typing import List

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
