"""Progress display (rich on a terminal, plain lines otherwise), metrics.jsonl and summary.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

console = Console(stderr=False, highlight=False)


class _OutputThatMayClose:
    """sys.stdout / sys.stderr for a long run whose reader may go away: `train ... | tee log` in a
    process group that Ctrl-C, `docker stop` or a scheduler signals as a whole. tee dies with the
    signal, and the trainer's next line raised BrokenPipeError (EPIPE) on its way to the step
    boundary: exit 1, no checkpoint, no summary (found by running it). On the first EPIPE the
    stream's file descriptor is pointed at /dev/null, so the run goes on to its checkpoint and exit
    code. Each line also goes through redact_text, so a secret that reaches a message by way of a
    path (a data root under a directory named with a token) is masked in the output as it is in
    config.yaml and summary.json; everything else is the stream's own."""

    def __init__(self, stream):
        from .redact import secret_values

        self._stream = stream
        self._secrets = secret_values()  # read once: the environment of a run does not change

    def _closed(self) -> None:
        import os

        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)

    def write(self, text):
        if isinstance(text, str):
            from .redact import redact_text

            text = redact_text(text, self._secrets)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._closed()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._closed()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Wrap sys.stdout and sys.stderr (once) in _OutputThatMayClose."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _OutputThatMayClose):
            try:
                stream.fileno()
            except (AttributeError, OSError, ValueError):  # no descriptor (pytest's capture): as it is
                continue
            setattr(sys, name, _OutputThatMayClose(stream))


def info(msg: str) -> None:
    """A plain log line (rank 0 decides whether to call it)."""
    console.print(msg, markup=False, soft_wrap=True)


class MetricsLog:
    """Appends one JSON object per log interval to metrics.jsonl (line-buffered: a kill loses at
    most the line being written)."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.f.close()


def tensorboard_writer(path: Path):
    """A TensorBoard SummaryWriter when tensorboard is installed (the `tensorboard` extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


class ProgressDisplay:
    """Epoch bar with images/s, loss, lr and ETA on a terminal; one plain line per log interval
    when stdout is not a terminal (CI, files, `docker logs`)."""

    def __init__(self, total_steps: int, steps_per_epoch: int, start_step: int,
                 enabled: bool = True, live: Optional[bool] = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.live = sys.stdout.isatty() if live is None else live
        self.progress: Optional[Progress] = None
        if enabled and self.live:
            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(), console=console, transient=False)
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                               epoch=start_step // steps_per_epoch, stats="")

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        stats = (f"loss {record['loss']:.4f}  lr {record['lr']:.4g}  "
                 f"{record['img_per_s']:.1f} img/s")
        if "target_entropy_frac" in record:  # collapse indicators: 1.0 / 1.0 = fully collapsed
            stats += f"  H/logK {record['target_entropy_frac']:.3f}  cos {record['queue_mean_cos']:.3f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], epoch=record["epoch"], stats=stats)
        else:
            info(f"step {record['step']}/{self.total_steps}  epoch {record['epoch']}  {stats}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
