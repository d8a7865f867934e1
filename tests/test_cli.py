"""One command-line style: shared flags, help with defaults, choices, correct program names, fast help."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import cli
import train
from configs import load_config, to_dict
from eval import finetune, knn, linear_probe, segmentation

ROOT = Path(__file__).resolve().parent.parent
PARSERS = {"train.py": train.build_parser, "python -m eval.knn": knn.build_parser,
           "python -m eval.linear_probe": linear_probe.build_parser,
           "python -m eval.finetune": finetune.build_parser,
           "python -m eval.segmentation": segmentation.build_parser}


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_entry_points_share_flags_and_document_defaults(prog):
    parser = PARSERS[prog]()
    assert parser.prog == prog
    flags = options(parser)
    assert {"--mlflow-uri", "--experiment", "--device", "--seed"} <= set(flags)
    assert "--uri" not in flags
    assert tuple(flags["--device"].choices) == cli.DEVICES and flags["--seed"].type is int
    for flag, action in flags.items():
        if flag not in ("-h", "--help"):
            assert action.help and ("default" in action.help or "required" in action.help), flag
    for flag in ("--loader", "--pool", "--dataset", "--model", "--global-pool"):
        if flag in flags:
            assert flags[flag].choices, f"{prog} {flag} is an enumeration without choices"


def test_train_flags_stand_for_config_keys():
    cfg, _ = train.parse_args(
        ["--config", "configs/demo.yaml", "train.epochs=5", "--experiment", "e", "--device", "cpu",
         "--seed", "7", "--mlflow-uri", "http://h:5000", "--loader", "dali"])
    assert (cfg.log.experiment, cfg.train.device, cfg.train.seed) == ("e", "cpu", 7)
    assert (cfg.log.mlflow_uri, cfg.data.loader, cfg.train.epochs) == ("http://h:5000", "dali", 5)
    with pytest.raises(SystemExit):
        train.build_parser().parse_intermixed_args(["--device", "tpu"])


def run_train(*argv: str) -> subprocess.CompletedProcess:
    """train.py as __main__ in a fresh interpreter; reports whether torch was imported."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['train.py', *{list(argv)!r}]\n"
            "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
            "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


def test_train_help_and_print_config_answer_before_torch_loads(tmp_path):
    done = run_train("--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: train.py")
    assert "torch imported: False" in done.stderr
    done = run_train("--config", "configs/demo.yaml", "--seed", "3", "train.epochs=7", "--print-config")
    assert done.returncode == 0 and "torch imported: False" in done.stderr
    (tmp_path / "resolved.yaml").write_text(done.stdout)
    overrides = ["train.seed=3", "train.epochs=7", "log.run_name=demo-seed3"]  # the same run folder
    expected = to_dict(load_config(ROOT / "configs" / "demo.yaml", overrides))
    assert to_dict(load_config(tmp_path / "resolved.yaml")) == {**expected, "name": "resolved"}


MODULE_COMMANDS = ("eval.knn", "eval.linear_probe", "eval.finetune", "eval.segmentation", "eval.compare",
                   "model.export", "noise.show", "pipelines.prepare")


@pytest.mark.parametrize("module", MODULE_COMMANDS)
def test_module_help_answers_before_torch_loads(module):
    """`python -m <module> --help` (as a fresh interpreter runs it) exits 0 without importing torch."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{module!r}, '--help']\n"
            f"try:\n    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
            "finally:\n    print('torch imported:', 'torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: python -m {module}")
    assert "torch imported: False" in done.stderr


def test_train_dry_run_builds_everything_and_trains_nothing(tmp_path, random_image_folder):
    images = random_image_folder(tmp_path / "images", 3)
    runs = tmp_path / "runs"
    done = run_train("--config", "configs/demo.yaml", f"data.path={images}", f"log.runs_root={runs}",
                     "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "dry run: config valid; data 6 images in 2 classes (0 skipped); model demo" in done.stdout
    assert not (tmp_path / "runs").exists()
    done = run_train("--config", "configs/demo.yaml", "mask.ratio=2", "--dry-run")
    assert done.returncode == 2 and "mask.ratio 2.0 must lie strictly between 0 and 1" in done.stderr
