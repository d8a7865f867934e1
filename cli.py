"""Command-line conventions shared by train.py and the eval/ commands (imports nothing heavy).

Each command defines its own `build_parser()` above its heavy imports and calls `answer_early` in an
`if __name__ == "__main__"` block before them, so --help and usage errors answer before torch loads.
The flags below mean the same thing everywhere: --mlflow-uri, --experiment, --device, --seed, the
checkpoint and data flags of the evaluations. Every option states its default in its help;
enumerations are `choices`.
"""

from __future__ import annotations

import argparse
import runpy
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from model.presets import PRESETS
from pipelines.backends import LOADERS

DEVICES = ("auto", "cpu", "cuda")  # --device and train.device
POOLS = ("cls", "avg")  # how one vector summarises an image: the cls token or the mean patch token


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser named as it is run (e.g. `python -m eval.knn`), with the module docstring as description."""
    return argparse.ArgumentParser(prog=prog, description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def answer_early(parser: argparse.ArgumentParser) -> None:
    """Parse sys.argv before the heavy imports: --help and usage errors exit here (`--debug` is
    errors.run_cli's flag, taken out first)."""
    parser.parse_args([arg for arg in sys.argv[1:] if arg != "--debug"])


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


def evaluation_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of `python -m <module>` with the checkpoint flags every evaluation shares:
    --checkpoint, --model, --mlflow-uri, --experiment, --device, --seed, --pretrain-run-id, --offline-dir."""
    parser = make_parser(f"python -m {module}", doc)
    parser.add_argument("--checkpoint", required=True,
                        help="the pretrained encoder: a train.py checkpoint (.pth), a model.export folder, "
                             "models:/NAME/VERSION or runs:/RUN_ID of --mlflow-uri's store (required)")
    parser.add_argument("--model", default=None, choices=sorted(PRESETS),
                        help="preset the checkpoint must match; checked, not rebuilt (default: no check)")
    add_common_args(parser, uri_default="the pretraining run's store, from the checkpoint config",
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
    parser.add_argument("--loader", choices=LOADERS, default="torch",
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
    """--epochs and --lr of the head an evaluation trains on frozen features (`eval.common.fit_head`)."""
    parser.add_argument("--epochs", type=int, default=epochs,
                        help=f"{head} training epochs (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help=f"{head} AdamW peak lr (default: %(default)s)")


# Console commands ([project.scripts] in pyproject.toml) -> the module each runs as `python -m`.
COMMANDS = {"colormae-train": "train", "colormae-knn": "eval.knn",
            "colormae-linear-probe": "eval.linear_probe",
            "colormae-segmentation": "eval.segmentation", "colormae-finetune": "eval.finetune",
            "colormae-compare": "eval.compare", "colormae-export": "model.export",
            "colormae-prepare": "pipelines.prepare", "colormae-tracking": "tracking"}


def _as_main(module: str) -> Callable[[], None]:
    """A console command's function: `module` runs exactly as `python -m module` (early --help included)."""
    def run() -> None:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    run.__doc__ = f"Run `python -m {module}` with this command's arguments."
    return run


train, knn, linear_probe, segmentation, finetune, compare, export, prepare, tracking = (
    _as_main(module) for module in COMMANDS.values())


def command(name: str, *args: str) -> str:
    """The console command `name` with `args`, as a hint the user can paste in any folder: by name when
    PATH finds this environment's script, else by its full path, else `<this python> -m <module>`."""
    script = Path(sys.executable).parent / name  # the environment's bin/ (sys.executable is not resolved)
    found = shutil.which(name)
    if found and script.exists() and Path(found).resolve() == script.resolve():
        head = [name]
    elif script.exists():
        head = [str(script)]
    else:
        head = [sys.executable, "-m", COMMANDS[name]]
    return shlex.join([*head, *args])
