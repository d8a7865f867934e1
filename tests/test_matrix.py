"""The combinations users run: every loader x tracking (MLflow's local store, an MLflow server that is
down, off) x 1 or 2 processes (gloo), each cell a 2-step run stopped by SIGTERM during step 1, then
the same command again, which resumes.

Every cell checks the same invariants: exit 0; the stop saved after step 1 and the resume read on
from there to step 2, on every rank; one MLflow run, FINISHED, with the encoder as a logged model (a
server that was down: its records kept offline, then synced); with tracking off, no MLflow run at
all. Across the cells, every loader, tracking path and number of processes logs the same params,
tags, metric names and dataset inputs. One-process cells run in this process; the two-process cells
of a loader share one torchrun launch (tests/matrix_worker.py). The images, their scan and the
.beton are shared by every cell. ffcv's cells (numba compiles its pipeline) and the torchrun launches
are marked slow: `make test` runs them all.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import tracking
import train
from model.pretrained import model_location

# ffcv's numba pipelines and DALI's pipelines raise harmless errors in their finalizers at garbage collection.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "matrix_worker.py"
LOADERS = [pytest.param(name, marks=[pytest.mark.slow] if name == "ffcv" else []) for name in
           ("torch", "dali", "ffcv")]
TRACKING = ("store", "down", "off")
BATCH = 8
TINY = ["model.args={depth: 1, decoder_depth: 1}", f"train.batch_size={BATCH}", "data.workers=0",
        "train.epochs=1", "train.steps_per_epoch=2", "train.warmup_epochs=0", "log.every_steps=1",
        "log.system_metrics=false"]
LOGGED: dict[tuple[str, str, int], dict] = {}  # (loader, tracking, processes) -> what its run logged


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory, random_image_folder) -> Path:
    """32 random 32x32 PNGs in two classes: 4 batches of 8, so an epoch of 2 steps stops early."""
    return random_image_folder(tmp_path_factory.mktemp("matrix") / "train", 16)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One runs root for every cell: one SQLite store (its set-up takes seconds), a run folder per cell."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server costs one refused connection
        yield tmp_path_factory.mktemp("runs")


def cell_args(images: Path, runs: Path, loader: str, mode: str, processes: int) -> list[str]:
    """The cell's train.py command line: `down` names a port nothing listens on."""
    store = {"store": [], "down": [f"--mlflow-uri=http://127.0.0.1:{free_port()}"],
             "off": ["log.mlflow=false"]}[mode]
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}", f"log.runs_root={runs}",
            f"data.loader={loader}", f"log.run_name={loader}-{mode}-{processes}", *TINY, *store]


def check_run(runs: Path, run_dir: Path, mode: str) -> dict | None:
    """A finished cell's MLflow run (a server that was down: synced first): one run, FINISHED, steps 1
    and 2, the encoder logged -> the names of its params, tags, metrics and dataset inputs; None when
    tracking was off (and then there is no run)."""
    run_id = torch.load(run_dir / "checkpoint-last.pth", weights_only=True)["mlflow_run_id"]
    offline = (run_dir / tracking.OFFLINE_FILE).is_file()
    assert offline == (mode == "down")
    if mode == "off":
        assert run_id is None
        return None
    uri = tracking.default_tracking_uri(runs)
    if mode == "down":
        assert run_id is None  # the server never answered
        [run_id] = tracking.sync(run_dir, uri)
    assert run_id is not None  # the resume continued the run it saved
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2]  # one run, resumed
    assert model_location(client, f"runs:/{run_id}") is not None  # the encoder, also after a sync
    names = {"params": sorted(run.data.params), "tags": sorted(run.data.tags),
             "metrics": sorted(run.data.metrics),
             "datasets": sorted((d.dataset.name, d.dataset.digest, d.dataset.profile)
                                for d in run.inputs.dataset_inputs)}
    assert names["datasets"] and "loss" in names["metrics"]
    return names


def logs_the_same_names(cell: tuple[str, str, int], names: dict | None) -> None:
    """Whatever the loader, tracking path or number of processes: the same params, tags, metric names
    and dataset inputs as the cells run before (compared with the first one, so with each other)."""
    if names is None:
        return
    other, first = next(iter(LOGGED.items()), (cell, names))
    for kind in names:
        assert names[kind] == first[kind], (kind, cell, other)
    LOGGED[cell] = names


def saved(run_dir: Path) -> tuple[int, list[int]]:
    """The last checkpoint's step and each rank's loader position (samples of the epoch read)."""
    ckpt = torch.load(run_dir / "checkpoint-last.pth", weights_only=True)
    return ckpt["step"], [loader["samples"] for loader in ckpt["loader"]]


@pytest.mark.parametrize("mode", TRACKING)
@pytest.mark.parametrize("loader", LOADERS)
def test_one_process(images, runs, monkeypatch, loader, mode):
    argv, run_dir = cell_args(images, runs, loader, mode, 1), runs / f"{loader}-{mode}-1"
    real_step = train.train_step

    def step_then_signal(run, batches):
        monkeypatch.setattr(train, "train_step", real_step)
        os.kill(os.getpid(), signal.SIGTERM)  # noted by the loop, which stops after this step
        return real_step(run, batches)

    monkeypatch.setattr(train, "train_step", step_then_signal)
    train.main(argv)  # a SystemExit here (an error line) fails the cell
    assert saved(run_dir) == (1, [BATCH])
    train.main(argv)
    assert saved(run_dir) == (2, [2 * BATCH])
    logs_the_same_names((loader, mode, 1), check_run(runs, run_dir, mode))


@pytest.mark.slow
@pytest.mark.parametrize("loader", LOADERS)
def test_two_processes(images, runs, loader):
    """The loader's three tracking cells on 2 processes (gloo), in one torchrun launch."""
    cells = [(cell_args(images, runs, loader, mode, 2), [free_port(), free_port()],
              str(runs / f"{loader}-{mode}-2")) for mode in TRACKING]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           "2", str(WORKER), json.dumps(cells)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for _, _, run_dir in cells:  # every rank stopped after step 1 and resumed at its position
        assert f"CELL {run_dir} stopped 1 {[BATCH, BATCH]}\n" in done.stdout, done.stdout
        assert f"CELL {run_dir} done 2 {[2 * BATCH, 2 * BATCH]}\n" in done.stdout, done.stdout
    for mode in TRACKING:
        logs_the_same_names((loader, mode, 2), check_run(runs, runs / f"{loader}-{mode}-2", mode))
