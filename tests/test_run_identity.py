"""One run folder, one experiment: what a start does with the checkpoint it finds.

Covered: any change of a key outside `configs.fingerprint.RESUMABLE` (every key of the schema) is
refused before any compute, naming the key and both values; resumable changes continue the run and
are recorded in MLflow; --continue-with accepts named keys; a finished run says so; changed data is
refused with what changed, and a .beton is checked against its folder; the documented train.py
examples never collide with an earlier example's run folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

import run_folder
import tracking
import train
from configs import Config, flatten, to_dict
from configs.fingerprint import is_resumable
from errors import DataError
from model.checkpoint import read_checkpoint
from pipelines import scan
from pipelines.prepare import ensure_beton

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.args={depth: 1, decoder_depth: 1}", "train.batch_size=8", "data.workers=0",
        "train.warmup_epochs=1", "log.every_steps=1", "train.epochs=2"]
pytestmark = pytest.mark.usefixtures("one_thread")
# Another valid value for each key whose default gives no obvious one (the rest: flipped, +1 or halved).
OTHER = {"model.preset": "vit_tiny", "model.args": "{depth: 2, decoder_depth: 1}", "data.img_size": "64",
         "mask.schedule": "blue", "train.epochs": "1", "train.steps_per_epoch": "3", "train.min_lr": "1e-6",
         "train.betas": "[0.9,0.99]", "train.clip_grad": "1.0", "train.precision": "fp32",
         "train.device": "cpu", "data.max_pixels": "1000000"}


@pytest.fixture(scope="module")
def images(tmp_path_factory, random_image_folder) -> Path:
    """48 random 32x32 PNGs in two class folders: 6 batches of 8 per epoch."""
    return random_image_folder(tmp_path_factory.mktemp("images") / "train", 24)


def args(images: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}", f"log.runs_root={runs}",
            *TINY, *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, images) -> Path:
    """A runs root with one finished 2-epoch run `r` (12 steps) in its MLflow store."""
    runs = tmp_path_factory.mktemp("runs")
    train.main(args(images, runs, "log.run_name=r"))
    return runs


@pytest.fixture
def runs(finished, tmp_path) -> Path:
    """A copy of the finished runs root, for a test to change."""
    return Path(shutil.copytree(finished, tmp_path / "runs"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(runs: Path) -> dict[str, str]:
    """Digest of every file under `runs` but the lock files (which record their last holder)."""
    return {str(p.relative_to(runs)): digest(p) for p in runs.rglob("*")
            if p.is_file() and p.suffix != ".lock"}


def untouched(runs: Path, before: dict[str, str]) -> None:
    """Nothing under `runs` changed (checkpoints, MLflow store, figures), and the lock is free."""
    assert files(runs) == before
    with open(run_folder.lock_path(runs / "r"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if a lock were left behind


def text(value) -> str:
    return "null" if value is None else str(value)


def refused(argv: list[str], capsys) -> str:
    """train.main(argv) ends with exit code 2 and one `error:` line; returns the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as err:
        train.main(argv)
    stderr = capsys.readouterr().err
    assert err.value.code == 2 and "Traceback" not in stderr, stderr
    return str(err.value)


def other_value(key: str, value, images: Path, tmp_path: Path) -> str:
    """An override giving `key` another value that passes validation."""
    if key in OTHER:
        return OTHER[key]
    if key == "data.path":
        return str(shutil.copytree(images, tmp_path / "other"))
    if key == "mask.bank":
        np.savez(tmp_path / "bank.npz", np.random.default_rng(0).random((4, 16, 16), dtype=np.float32))
        return str(tmp_path / "bank.npz")
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 1)
    if isinstance(value, float):
        return str(value / 2)
    raise AssertionError(f"no other value for {key}={value!r}: add one to OTHER")


DEFINING = [key for key in flatten(Config()) if not is_resumable(key)] + ["train.epochs"]  # epochs: downward


@pytest.mark.parametrize("key", DEFINING)
def test_any_change_outside_the_resumable_keys_is_refused_before_any_compute(runs, images, tmp_path, key,
                                                                           capsys):
    before = files(runs)
    old = flatten(train.parse_args(args(images, runs, "log.run_name=r"))[0])
    value = other_value(key, old.get(key), images, tmp_path)
    argv = args(images, runs, f"{key}={value}", "log.run_name=r")
    message = refused(argv, capsys)
    new = flatten(train.parse_args(argv)[0])
    if not isinstance(old.get(key, {}), dict):  # model.args is named by its entries: model.args.depth ...
        assert f"{key} {text(old[key])} -> {text(new[key])}" in message
    assert key in message and "log.run_name=NAME" in message and "--continue-with" in message
    assert message.startswith(f"error: {runs / 'r' / 'checkpoint-last.pth'} holds another experiment")
    untouched(runs, before)


def test_resumable_changes_continue_the_run_and_are_recorded(finished, runs, images, caplog):
    argv = args(images, runs, "log.run_name=r", "train.epochs=3", "log.every_steps=2", "data.workers=1")
    with caplog.at_level(logging.INFO, logger="train"):
        train.main(argv)
    [line] = [r.getMessage() for r in caplog.records if "resuming" in r.getMessage()]
    assert line.endswith(f"at epoch 2, step 12; changed: data.workers 0 -> 1; log.every_steps 1 -> 2; "
                         f"log.runs_root {finished} -> {runs}; train.epochs 2 -> 3")  # runs: a copy
    client = MlflowClient(tracking.default_tracking_uri(runs))
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.tags["colormae.changes.step12"] == line.split("changed: ")[1]
    assert run.data.params["train.epochs"] == "2"  # the params say how the run started
    assert read_checkpoint(runs / "r" / "checkpoint-last.pth")["step"] == 18


def test_continue_with_accepts_the_keys_it_names(runs, images, capsys):
    schedule = "mask.schedule=green@0,blue@2"
    message = refused(args(images, runs, "log.run_name=r", "train.epochs=3", schedule), capsys)
    assert "mask.schedule green -> green@0,blue@2" in message and "train.epochs" not in message
    train.main(args(images, runs, "log.run_name=r", "train.epochs=3", schedule,
                    "--continue-with", "mask.schedule"))
    ckpt = read_checkpoint(runs / "r" / "checkpoint-last.pth")
    assert ckpt["step"] == 18 and ckpt["config"]["mask"]["schedule"] == "green@0,blue@2"
    assert "no such config key" in refused(args(images, runs, "--continue-with", "mask.shedule"), capsys)


def test_a_finished_run_says_so_and_changes_nothing(runs, images, capsys):
    before = files(runs)
    capsys.readouterr()
    assert train.main(args(images, runs, "log.run_name=r", "log.every_steps=3")) is None
    assert capsys.readouterr().out == (f"{runs / 'r'} is finished: 2 of 2 epochs trained (step 12), nothing "
                                       "to do. More epochs: train.epochs=N; another experiment: "
                                       "log.run_name=NAME\n")
    untouched(runs, before)


def test_the_readme_blue_example_after_the_demo_trains_its_own_run(images, tmp_path, capsys):
    """`make train`, then the README's `train.epochs=10 mask.schedule=blue` (tiny budgets)."""
    train.main(args(images, tmp_path))
    demo = digest(tmp_path / "demo" / "checkpoint-last.pth")
    train.main(args(images, tmp_path, "train.epochs=3", "mask.schedule=blue"))
    assert digest(tmp_path / "demo" / "checkpoint-last.pth") == demo
    assert read_checkpoint(tmp_path / "demo-blue" / "checkpoint-last.pth")["step"] == 18
    client = MlflowClient(tracking.default_tracking_uri(tmp_path))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted((r.info.run_name, r.data.params["mask.schedule"]) for r in runs) == [
        ("demo", "green"), ("demo-blue", "blue")]


def test_changed_data_is_refused_with_what_changed(images, tmp_path, capsys, random_image_folder):
    data = shutil.copytree(images, tmp_path / "data")
    train.main(args(data, tmp_path / "runs", "log.mlflow=false", "train.epochs=1"))
    for name in ("0.png", "1.png"):  # one image moves to the other class, one goes
        shutil.move(data / "a" / name, data / "b" / f"moved-{name}" if name == "0.png" else tmp_path / name)
    random_image_folder(tmp_path / "more", 2)
    for path in (tmp_path / "more").rglob("*.png"):
        shutil.copy(path, data / path.parent.name / f"new-{path.name}")
    message = refused(args(data, tmp_path / "runs", "log.mlflow=false"), capsys)
    assert re.search(r"data\.signature \w+ -> \w+ \(48 -> 51 images: 5 files added, 2 removed, "
                     r"0 changed class\)", message), message
    assert "--continue-with data.signature" in message
    train.main(args(data, tmp_path / "runs", "log.mlflow=false", "--continue-with", "data.signature"))
    assert read_checkpoint(tmp_path / "runs" / "demo" / "checkpoint-last.pth")["step"] == 12


def test_a_beton_is_checked_against_the_folder_it_was_written_from(images, tmp_path):
    manifest = scan(images)
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"not read: only its record is")
    with pytest.raises(DataError, match=r"cannot be checked against data\.path"):
        ensure_beton(manifest, str(beton), 0)
    Path(f"{beton}.json").write_text(json.dumps({"signature": "0123456789ab", "num_images": 50}))
    with pytest.raises(DataError, match=r"written from another state of .* \(50 images, signature "
                                        r"0123456789ab; the folder now has 48"):
        ensure_beton(manifest, str(beton), 0)
    Path(f"{beton}.json").write_text(json.dumps({"signature": manifest.signature()}))
    assert ensure_beton(manifest, str(beton), 0) == beton


# -- the documented examples ----------------------------------------------------------------------
DOCUMENTS = ("Makefile", "README.md", "train.py", "docs/design.md", "pipelines/README.md",
             "docker/README.md", "DEVELOPERS.md")  # in reading order: `make train` is the first step
LAUNCHERS = ("train.py", "colormae", "train.sbatch")  # what runs train.py with the arguments after it


# A command line, with the lines it continues on (a trailing backslash).
COMMAND = re.compile(r"^[ \t]*(?:\$\(PY\)|\.venv/bin/python|python|torchrun|docker run|sbatch)\s"
                     r"(?:.*\\\n)*.*$",
                     re.MULTILINE)


def documented_examples() -> list[tuple[str, list[str]]]:
    """(where, train.py arguments) of every documented command that trains, in reading order."""
    examples = []
    for name in DOCUMENTS:
        text = (ROOT / name).read_text()
        for match in COMMAND.finditer(text):
            words = shlex.split(match.group().replace("\\\n", " "), comments=True)
            starts = [i for i, word in enumerate(words) if word.endswith(LAUNCHERS)]
            if starts and words[starts[0] + 1: starts[0] + 2] in (["--config"], []):
                train_args = words[starts[0] + 1:]
                if not {"--help", "--print-config", "--dry-run"} & set(train_args):
                    examples.append((f"{name}:{text.count(chr(10), 0, match.start()) + 1}", train_args))
    return examples


def test_the_documented_examples_never_collide_with_an_earlier_one(tmp_path):
    """Each example starts as train.py would, on the run folders the examples before it left (a
    checkpoint of their finished run): none may be refused, and each of the README's own trains a
    run of its own. The examples' data is one folder (the same data, mounted anywhere)."""
    examples = documented_examples()
    assert len(examples) >= 8 and examples[0][0].startswith("Makefile")
    for where, example in examples:
        parsed = train.parse_args([*example, "data.path=data", f"log.runs_root={tmp_path}"])[0]
        start = run_folder.resume_point(parsed, None, world=1)  # raises AnotherExperiment: a collision
        assert start is None or not where.startswith("README.md"), f"{where} continues {start.path}"
        folder = run_folder.path(parsed)
        folder.mkdir(parents=True, exist_ok=True)
        run_folder.save_checkpoint({"model": {}, "optimizer": {}, "scaler": {}, "epoch": parsed.train.epochs,
                                    "step": 0, "loader": [{}], "rng": [{}],
                                    "config": to_dict(parsed)}, folder / "checkpoint-last.pth")
