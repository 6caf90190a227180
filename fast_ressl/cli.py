"""Command line: `fast-ressl SUBCOMMAND ...` (also `python -m fast_ressl SUBCOMMAND ...`)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, load_config
from .plot import PlotError  # matplotlib itself is imported only when a picture is drawn


def _cmd_train(args: argparse.Namespace) -> int:
    from .dist import world_size_from_env
    from .checkpoint import RunDirBusy
    from .train import ConfigMismatch, NonFiniteAbort, Preempted, train  # deferred: `--help` stays fast

    cfg = load_config(args.config, args.overrides, world_size=world_size_from_env())
    try:
        train(cfg, allow_config_change=args.allow_config_change)
    except (ConfigMismatch, RunDirBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteAbort as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:  # checkpoint written; 143 for SIGTERM, 130 for SIGINT
        return e.exit_code
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def _cmd_plot_bench(args: argparse.Namespace) -> int:
    import json

    from .plot import plot_bench

    path = Path(args.bench_json)
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PlotError(f"cannot read the bench report {path}: {e}") from None
    print(f"wrote {plot_bench(report, args.out or path.with_suffix('.png'))}")
    return 0


class _DropMessage(logging.Filter):
    """Drops one logger's records whose message starts with `prefix`; everything else passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_irrelevant_warnings() -> None:
    """Silence exactly the warnings that say nothing about the user's run.

    torch.utils.cpp_extension, imported by torch.compile's inductor when it builds the CPU kernels
    of the compiled loss, logs "No CUDA runtime is found, using CUDA_HOME=..." on every machine that
    has a CUDA toolkit directory but no usable GPU: a CPU run does not use CUDA, so the line only
    worries. Only that message of that logger is dropped; other warnings still show."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):  # main() may run many times
        logger.addFilter(_DropMessage("No CUDA runtime is found"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast-ressl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(commands=sub.choices)  # main(): a subcommand's unknown option gets its usage

    p = sub.add_parser("train", help="pretrain (or resume) a backbone with ReSSL",
                       description="Pretrain with ReSSL. CONFIG is a YAML recipe (differences from the "
                       "defaults); overrides are dotted key=value pairs, e.g. train.epochs=10. Running "
                       "the same command again resumes from the run directory's last checkpoint.")
    p.add_argument("config", help="YAML recipe, e.g. configs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even if the config differs from the checkpoint's")
    p.set_defaults(func=_cmd_train)
    from .datasets import add_cli_commands  # scan, wds-index (data path; no DALI import)

    add_cli_commands(sub)
    from . import bench, benchdata  # bench, make-bench-data (torch imported lazily by bench)

    bench.add_cli_command(sub)
    benchdata.add_cli_command(sub)
    from .eval_cli import add_cli_commands as add_eval_commands  # knn, linear, export

    add_eval_commands(sub)

    p = sub.add_parser("plot", help="draw a run's curves into RUN_DIR/curves.png (the plot extra)",
                       description="Loss, collapse indicators (when logged), lr and teacher momentum, "
                       "kNN top-1 over epochs, images/s and data-wait fraction from RUN_DIR/metrics.jsonl, "
                       "with resumes and skipped steps marked. Also drawn at the end of every run. "
                       "Needs matplotlib: pip install 'fast_ressl[plot]'.")
    p.add_argument("run_dir", help="a run directory, e.g. runs/demo")
    p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    p.set_defaults(func=_cmd_plot)
    p = sub.add_parser("plot-bench", help="draw a bench report's images/s bars (the plot extra)",
                       description="Bars of images/s per mode for fast, reference and each ablation of a "
                       "`fast-ressl bench` JSON report, with the speed-up over the reference on the bars.")
    p.add_argument("bench_json", help="the JSON report written by fast-ressl bench --out")
    p.add_argument("--out", default=None, help="PNG path (default: beside the JSON, .png)")
    p.set_defaults(func=_cmd_plot_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # argparse's parse_args would print the top level's usage, which lists no option
        before = argv[:argv.index(args.command)]  # `fast-ressl --foo train ...`: not train's option
        (parser if any(u in before for u in unknown) else args.commands[args.command]).error(
            f"unrecognized arguments: {' '.join(unknown)}")
    quiet_irrelevant_warnings()
    from .log import survive_closed_output

    survive_closed_output()
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except PlotError as e:  # a missing matplotlib or input: the user's to fix, not a crash
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - user errors become one line; anything else re-raises
        line = user_error(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2


# OS errors that are the machine's state, not a bug: the message (with its path) is what to act on
_USER_ERRNOS = {"ENOSPC": "no space left on the device", "EDQUOT": "disk quota exceeded",
                "EROFS": "read-only file system", "EACCES": "permission denied", "ENOENT": "no such file",
                "ELOOP": "symbolic link loop", "ENOTDIR": "not a directory"}


def user_error(e: BaseException) -> Optional[str]:
    """The one-line message for an error the user can fix (bad data, checkpoint, disk), else None.

    Data errors (missing or empty root, corrupt denylist, symlink loops) and checkpoint errors
    already name their path; OS errors get theirs (errno name, file) so a full disk is not buried in
    a traceback."""
    import errno

    from .checkpoint import CheckpointError
    from .datasets import DataError

    if isinstance(e, (DataError, CheckpointError)):
        return str(e)
    if isinstance(e, OSError) and e.errno is not None:
        name = errno.errorcode.get(e.errno, "")
        if name in _USER_ERRNOS:
            where = e.filename or ""
            return f"{_USER_ERRNOS[name]} ({name}){': ' + str(where) if where else ''}" + (
                "; free space or point run.dir elsewhere, then run the same command to resume"
                if name in ("ENOSPC", "EDQUOT") else "")
    return None


if __name__ == "__main__":
    sys.exit(main())
