"""Command-line conventions shared by train.py and the eval/ commands (imports nothing heavy).

The same flag means the same thing everywhere: --mlflow-uri, --experiment, --device, --seed. Every
option states its default in its help; enumerations are `choices`.
"""

from __future__ import annotations

import argparse

from configs.config import DEVICES  # the config sections' own lists (they import no torch)
from pipelines.config import LOADERS


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser named as it is run (e.g. `python -m eval.knn`), with the module docstring as description."""
    return argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_common_args(parser: argparse.ArgumentParser, *, uri_default: str, experiment_default: str,
                    device_default: str | None = "auto", seed_default: int | None = 0) -> None:
    """--mlflow-uri, --experiment, --device and --seed; the *_default texts describe None defaults."""
    parser.add_argument("--mlflow-uri", default=None, help=f"MLflow tracking URI (default: {uri_default})")
    parser.add_argument("--experiment", default=None,
                        help=f"MLflow experiment name (default: {experiment_default})")
    parser.add_argument("--device", choices=DEVICES, default=device_default,
                        help="where to compute; auto = cuda when available (default: "
                             f"{device_default or 'the config value'})")
    parser.add_argument("--seed", type=int, default=seed_default,
                        help=f"random seed (default: {'the config value' if seed_default is None else 0})")


def train_parser(doc: str | None = None) -> argparse.ArgumentParser:
    """The command line of train.py (`doc`: its description)."""
    parser = make_parser("train.py", doc)
    parser.add_argument("--config", help="YAML file in configs/ (default: the built-in paper recipe)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides such as train.epochs=2 mask.schedule=blue (default: none)")
    parser.add_argument("--loader", choices=LOADERS, help="data loader (default: the config's data.loader)")
    parser.add_argument("--resume",
                        help="checkpoint or run folder (default: the run's checkpoint-last.pth, if any)")
    add_common_args(parser, uri_default="log.mlflow_uri, else MLFLOW_TRACKING_URI, else SQLite in the "
                    "runs root", experiment_default="the config's log.experiment", device_default=None,
                    seed_default=None)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, scan the data and build the model, then exit "
                             "without training (default: off)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected failure, like COLORMAE_DEBUG=1 "
                             "(default: off)")
    return parser


def train_overrides(args: argparse.Namespace) -> list[str]:
    """train.py's positional key=value overrides, then those its flags stand for."""
    flags = {"loader": "data.loader", "mlflow_uri": "log.mlflow_uri", "experiment": "log.experiment",
             "device": "train.device", "seed": "train.seed"}
    return [*args.overrides, *(f"{key}={getattr(args, flag)}" for flag, key in flags.items()
                               if getattr(args, flag) is not None)]


def train_answer_early(doc: str | None, argv: list[str]) -> None:
    """Answer train.py --help and --print-config before torch is imported (that takes seconds)."""
    import errors
    from configs import dump_config, load_config

    args = train_parser(doc).parse_intermixed_args(argv)
    if args.print_config:
        with errors.reported(args.debug):
            print(dump_config(load_config(args.config, train_overrides(args))), end="")
        raise SystemExit(0)
