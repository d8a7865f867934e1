"""Elastic resume: a checkpoint written by N processes goes on with M.

The invariant, for every N, M in {1, 2, 3}: over an interrupted epoch, every sample of the epoch's order
is read exactly once in total, the masks of the remaining batches are those of (seed, rank, epoch,
index) under the new world. End to end (slow): 1 -> 2 processes under torchrun, the one line of a
batch that does not split, and an elastic job of two torchrun agents that loses one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

import tracking
from noise import MaskGenerator
from pipelines import LoaderConfig, build_loader, scan
from pipelines.base import epoch_order

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "elastic_worker.py"
IMAGES, GLOBAL_BATCH = 24, 6  # 4 steps per epoch on 1, 2 or 3 processes
LAST_CALL = 20  # seconds a rendezvous waits for more agents: the second joins, the restart goes alone
pytestmark = pytest.mark.usefixtures("one_thread")


def colour(index: int) -> tuple[int, int, int]:
    return 10 * index, 255 - 10 * index, (70 + 37 * index) % 256


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory) -> Path:
    """IMAGES 32x32 PNGs of one flat colour each (any crop keeps it), in two class folders; the
    colours in colours.json (index = the number in the file name)."""
    root = tmp_path_factory.mktemp("flat")
    for index in range(IMAGES):
        folder = root / "train" / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour(index)).save(folder / f"{index}.png")
    (root / "colours.json").write_text(json.dumps([colour(i) for i in range(IMAGES)]))
    return root / "train"


def ranks(folder: Path, backend: str, world: int) -> list:
    """The loaders of `world` processes sharing the global batch."""
    return [build_loader(LoaderConfig(
        loader=backend, data=str(folder), img_size=32, patch_size=8, batch_size=GLOBAL_BATCH // world,
        workers=0 if backend == "torch" else 1, schedule="green@0,blue@1", seed=3, rank=rank,
        world_size=world)) for rank in range(world)]


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("before", [1, 2, 3])
@pytest.mark.parametrize("after", [1, 2, 3])
def test_an_interrupted_epoch_reads_each_sample_once_on_any_world_size(flat_images, backend, before, after):
    """Epoch 1 read for 2 global batches by `before` processes, the rest by `after` processes after a
    checkpoint: together, the epoch's order, each sample once; the new ranks' masks are those of
    (seed, rank, epoch, index) with the index counted in the new world's batches."""
    files = scan(flat_images).files
    file_id = {index: int(Path(path).stem) for index, path in enumerate(files)}  # manifest index -> id
    colours = torch.tensor([colour(i) for i in range(IMAGES)], dtype=torch.float32)

    def ids(batch: dict) -> list[int]:
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        rgb = (batch["images"].mean(dim=(2, 3)) * std + mean) * 255
        return torch.cdist(rgb, colours).argmin(dim=1).tolist()

    seen = []
    first = ranks(flat_images, backend, before)
    for loader in first:
        loader.set_epoch(1)
        batches = iter(loader)
        seen += [i for _ in range(2) for i in ids(next(batches))]
    states = [loader.state_dict() for loader in first]
    assert states == [{"epoch": 1, "samples": 2 * GLOBAL_BATCH}] * before

    for rank, loader in enumerate(ranks(flat_images, backend, after)):
        loader.load_state_dict(states[0])
        loader.set_epoch(1)
        generator = MaskGenerator(schedule="green@0,blue@1", grid=4, mask_ratio=0.75, seed=3, rank=rank)
        for index, batch in enumerate(loader, start=2):  # 2 x 6 samples read: 2 global batches in any world
            expected = generator(GLOBAL_BATCH // after, epoch=1, index=index)
            assert torch.equal(batch["mask"], torch.from_numpy(expected)), (rank, index)
            seen += ids(batch)
    order = [file_id[int(i)] for i in epoch_order(IMAGES, seed=3, epoch=1, shuffle=True)]
    assert sorted(seen) == sorted(order) == list(range(IMAGES))  # each sample of the epoch once


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def train_args(images: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}", f"log.runs_root={runs}",
            "model.args={depth: 1, decoder_depth: 1}", f"train.batch_size={GLOBAL_BATCH}", "data.workers=0",
            "train.epochs=2", "train.steps_per_epoch=null", "train.warmup_epochs=1", "log.every_steps=1",
            "log.recon_every=0", "log.run_name=elastic", *extra]


def worker(record: Path, images: Path, stop_at: int = 0, pause_at: int = 0) -> list[str]:
    return [str(WORKER), str(record), str(images.parent / "colours.json"), str(stop_at), str(pause_at)]


def launch(processes: int, record: Path, images: Path, runs: Path, stop_at: int = 0):
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run([*launcher, *worker(record, images, stop_at), *train_args(images, runs)],
                          cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def steps_read(record: Path) -> dict[int, list[int]]:
    """Step -> the image ids it trained on, all ranks together, from the last attempt that made it."""
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    last = {}  # step -> the last torchrun attempt (restart) that made it
    for entry in entries:
        last[entry["step"]] = max(last.get(entry["step"], 0), entry["restart"])
    steps: dict[int, list[int]] = {}
    for entry in entries:
        if entry["restart"] == last[entry["step"]]:
            steps.setdefault(entry["step"], []).extend(entry["ids"])
    return dict(sorted(steps.items()))


def check_each_epoch_reads_each_image_once(record: Path, epochs: int = 2) -> None:
    steps = steps_read(record)
    per_epoch = IMAGES // GLOBAL_BATCH
    assert sorted(steps) == list(range(1, epochs * per_epoch + 1))
    for epoch in range(epochs):
        seen = [i for step in range(epoch * per_epoch + 1, (epoch + 1) * per_epoch + 1) for i in steps[step]]
        assert sorted(seen) == list(range(IMAGES)), f"epoch {epoch}"


def one_mlflow_run(runs: Path):
    client = MlflowClient(tracking.default_tracking_uri(runs))
    experiments = [e.experiment_id for e in client.search_experiments()]
    [run] = client.search_runs(experiments)
    assert run.info.status == "FINISHED"
    return client, run


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(1, 2)])  # 2 -> 1: the loader invariant above
def test_a_run_stopped_mid_epoch_goes_on_with_another_number_of_processes(flat_images, tmp_path, before,
                                                                          after):
    record, runs = tmp_path / "record.jsonl", tmp_path / "runs"
    launch(before, record, flat_images, runs, stop_at=6)  # SIGTERM after step 6: 2 steps into epoch 1
    checkpoint = torch.load(runs / "elastic" / "checkpoint-last.pth", weights_only=True)
    assert (checkpoint["step"], checkpoint["loader"][0]) == (6, {"epoch": 1, "samples": 2 * GLOBAL_BATCH})
    done = launch(after, record, flat_images, runs)
    assert f"elastic resume: written by {before} processes" in done.stderr

    check_each_epoch_reads_each_image_once(record)
    client, run = one_mlflow_run(runs)
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 9))  # one history, each step once
    world = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size"))
    assert world == [(0, before), (6, after)]
    final = torch.load(runs / "elastic" / "checkpoint-last.pth", weights_only=True)
    assert final["step"] == 8 and final["optimizer"]["state"][0]["step"].item() == 8  # AdamW went on


@pytest.mark.slow
def test_a_batch_that_does_not_split_ends_with_the_one_line_under_torchrun(flat_images, tmp_path):
    """Through docker/entrypoint.py: torchrun's ChildFailedError report, then the trainers' message (once,
    though each process wrote it), exit 2."""
    env = {**worker_env(), "NPROC_PER_NODE": "2"}
    done = subprocess.run([sys.executable, str(ROOT / "docker" / "entrypoint.py"),
                           *train_args(flat_images, tmp_path, "train.batch_size=5", "log.mlflow=false")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "ChildFailedError" in done.stderr  # torchrun's own report comes first
    assert done.stderr.endswith("error: invalid configuration:\n  - train.batch_size 5 is not divisible by "
                                "world size 2 x train.accum_steps 1\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, seconds: float, what: str, logs) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {seconds} s:\n{logs()}")
        time.sleep(0.1)


@pytest.mark.slow
def test_an_elastic_job_finishes_on_the_node_left_after_losing_one(flat_images, tmp_path):
    """Two torchrun agents (c10d rendezvous on loopback, --nnodes=1:2, --max-restarts=1), one process
    each; the agent that does not host the rendezvous is killed with its trainer in the middle of
    epoch 1: the other restarts alone from the last checkpoint and finishes, each epoch reading each
    image once, into one MLflow run."""
    record, runs, port = tmp_path / "record.jsonl", tmp_path / "runs", free_port()

    def agent(hosts: bool) -> subprocess.Popen:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
                   "--max-restarts=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   "--rdzv-id=elastic-test", "--local-addr=127.0.0.1",
                   f"--rdzv-conf=is_host={int(hosts)},last_call_timeout={LAST_CALL}",
                   *worker(record, flat_images, pause_at=7), *train_args(flat_images, runs)]
        with open(tmp_path / f"agent-{'host' if hosts else 'other'}.log", "w") as log:
            return subprocess.Popen(command, cwd=ROOT, env=worker_env(), stdout=log, stderr=subprocess.STDOUT)

    def logs() -> str:
        return "\n".join(path.read_text()[-3000:] for path in sorted(tmp_path.glob("agent-*.log")))

    agents = [agent(hosts=True)]
    try:
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 120, "rendezvous store", logs)
        agents.append(agent(hosts=False))
        paused = [Path(f"{record}.paused-{rank}") for rank in (0, 1)]
        wait_for(lambda: all(p.exists() for p in paused), 300, "pause before step 7 on both nodes", logs)
        lost = psutil.Process(agents[1].pid)
        for process in [lost, *lost.children(recursive=True)]:  # the node goes: its agent and trainer
            process.send_signal(signal.SIGKILL)
        agents[1].wait()
        Path(f"{record}.go").touch()
        agents[0].wait(timeout=400)
    finally:
        for process in agents:
            if process.poll() is None:
                process.kill()
    assert agents[0].returncode == 0, logs()
    check_each_epoch_reads_each_image_once(record)
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    assert {(e["restart"], e["world"]) for e in entries} == {(0, 2), (1, 1)}
    assert min(e["step"] for e in entries if e["restart"] == 1) == 5  # from the checkpoint of epoch 0
    client, run = one_mlflow_run(runs)
    world = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "world_size"))
    assert world == [(0, 2), (4, 1)]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == set(range(1, 9))
