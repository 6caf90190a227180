"""Command line: `fast-ressl SUBCOMMAND ...` (also `python -m fast_ressl SUBCOMMAND ...`)."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ConfigError, load_config


def _cmd_train(args: argparse.Namespace) -> int:
    from .dist import world_size_from_env
    from .train import ConfigMismatch, NonFiniteAbort, Preempted, train  # deferred: `--help` stays fast

    cfg = load_config(args.config, args.overrides, world_size=world_size_from_env())
    try:
        train(cfg, allow_config_change=args.allow_config_change)
    except ConfigMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteAbort as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Preempted as e:  # checkpoint written; 143 for SIGTERM, 130 for SIGINT
        return e.exit_code
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fast-ressl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
