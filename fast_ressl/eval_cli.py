"""`fast-ressl knn | linear | export` (argparse only; torch is imported when a command runs)."""
from __future__ import annotations

import argparse
import sys

_SRC = "run directory (runs/<name>) or checkpoint file (.pt)"
_ROOTS = ("labelled class folders; default: the run's embedded train/val split, or data.root and "
          "data.val_root for data.source=folder")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help=_SRC)
    p.add_argument("--teacher", action="store_true", help="use the teacher (EMA) backbone instead of the student")
    p.add_argument("--train-root", help="training " + _ROOTS)
    p.add_argument("--val-root", help="validation class folders (see --train-root)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="images per batch (default 256); in `linear` also the probe's SGD batch: the "
                        "recipe's lr 0.3 goes with 256 and --lr is not scaled with it")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", help="JSON result file (default: <run dir>/knn.json or linear.json)")


def _run(fn, **kwargs) -> int:
    try:
        fn(**kwargs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_knn(a: argparse.Namespace) -> int:
    from .evaluate import knn_command

    return _run(knn_command, path=a.source, teacher=a.teacher, train_root=a.train_root,
                val_root=a.val_root, k=a.k, temperature=a.temperature, train_samples=a.train_samples,
                compare_random=a.compare_random, batch_size=a.batch_size, device=a.device, out=a.out)


def _cmd_linear(a: argparse.Namespace) -> int:
    from .evaluate import linear_command

    return _run(linear_command, path=a.source, teacher=a.teacher, train_root=a.train_root,
                val_root=a.val_root, epochs=a.epochs, lr=a.lr, momentum=a.momentum,
                weight_decay=a.weight_decay, batch_size=a.batch_size, augment=not a.no_augment,
                device=a.device, out=a.out)


def _cmd_export(a: argparse.Namespace) -> int:
    from .evaluate import export_backbone

    try:
        export_backbone(a.source, a.output, teacher=a.teacher)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def add_cli_commands(sub) -> None:
    p = sub.add_parser("knn", help="weighted kNN top-1/top-5 of a pretrained backbone",
                       description="Weighted kNN (L2-normalised features, cosine similarity, vote "
                       "weight exp(sim/T)) on center crops; prints top-1/top-5 and writes JSON.")
    _common(p)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--train-samples", type=int, default=0, help="random training subset (0 = all)")
    p.add_argument("--compare-random", action="store_true",
                   help="also evaluate the same backbone randomly initialised")
    p.set_defaults(func=_cmd_knn)

    p = sub.add_parser("linear", help="linear probe on the frozen backbone (final-epoch top-1/top-5)",
                       description="Linear probe, the ReSSL protocol by default: frozen backbone in "
                       "eval mode, fc init N(0, 0.01), SGD lr 0.3 momentum 0.9, no weight decay, "
                       "batch 256, cosine, 100 epochs, RandomResizedCrop + flip. Reports the final "
                       "epoch (not the best).")
    _common(p)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--no-augment", action="store_true",
                   help="train on cached center-crop features (fast; for small data and smoke tests)")
    p.set_defaults(func=_cmd_linear)

    p = sub.add_parser("export", help="backbone weights as timm-loadable safetensors",
                       description="Write the backbone (student by default) with the keys of "
                       "timm.create_model(name, num_classes=0).state_dict(). Load with "
                       "timm.create_model(name, pretrained=True, "
                       "pretrained_cfg_overlay=dict(file=OUT, num_classes=0)).")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help=_SRC)
    p.add_argument("output", metavar="OUT.safetensors")
    p.add_argument("--teacher", action="store_true", help="export the teacher (EMA) backbone")
    p.set_defaults(func=_cmd_export)
