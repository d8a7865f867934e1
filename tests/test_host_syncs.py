"""The hot loop reads nothing on the host it does not need: at most one read per training step (one
per log window, for the non-finite-loss check), none in the model's forward, which torch.compile
traces as one graph. Checked on the CPU twin: on a GPU each read is a sync that drains the queue."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import train
from configs import load_config
from model import MaskedAutoencoderViT, build_mae
from noise import MaskGenerator, mask_to_torch
from train_report import SUMMARY_FILE, Report

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.args={depth: 1, decoder_depth: 1}", "train.batch_size=8", "train.warmup_epochs=0",
        "log.mlflow=false", "log.recon_every=0"]
READS = {"item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"}  # tensor -> host values
pytestmark = pytest.mark.usefixtures("one_thread")


class HostReads(TorchFunctionMode):
    """Counts the calls that bring a tensor's values to the host (each one a sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def images(tmp_path_factory, random_image_folder) -> Path:
    """48 random 32x32 PNGs in two class folders: 6 batches of 8 per epoch."""
    return random_image_folder(tmp_path_factory.mktemp("images") / "train", 24)


def argv(images: Path, runs: Path, *extra: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={images}", f"log.runs_root={runs}",
            *TINY, *extra]


def test_a_training_step_reads_the_host_at_most_once(images, tmp_path):
    """Steps of the real loop (torch loader with a worker, mask stage, step, report) with a log window
    of 3 steps: one read in the window's last step, none in the others."""
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.path={images}", f"log.runs_root={tmp_path}", *TINY, "data.workers=1", "log.every_steps=3"])
    run = train.build(cfg)
    # The GPU's optimiser: fused AdamW (the CPU default, foreach, reads each step count with .item()).
    run.optimizer, run.scheduler = train.build_optimizer(run.model, cfg.train, cfg.lr, warmup_steps=0,
                                                         total_steps=6, fused=True)
    report = Report(run)
    batches = iter(run.loader)
    first = next(batches)  # the epoch's start-up: workers launch, the DataLoader draws its seed (.item())
    batches = itertools.chain([first], batches)
    reads = []
    for _ in range(6):
        with HostReads() as mode:
            report.step(train.train_step(run, batches), epoch=0)
        reads.append(mode.calls)
    assert reads[2] == reads[5] == ["tolist"]  # the window's losses, in one transfer
    assert reads[:2] == reads[3:5] == [[], []]
    assert len(report.rates) == 2


def test_mae_forward_compiles_to_one_graph_and_reads_nothing():
    """With K given, mask_to_ids needs no host read: torch.compile(fullgraph=True) traces the forward
    (a graph break raises), and the compiled forward gives the eager loss."""
    model = build_mae("demo", depth=1, decoder_depth=1)
    masks = MaskGenerator("green", grid=8, mask_ratio=0.75)
    mask = mask_to_torch(masks(4, epoch=0, index=0))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with HostReads() as mode:
        eager = model(images, mask, num_visible=masks.num_visible)[0]
    assert mode.calls == []
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo's tracing only: seconds
    torch.testing.assert_close(compiled(images, mask, num_visible=masks.num_visible)[0], eager)
    assert model.visible_count(0.75) == masks.num_visible


def test_a_non_finite_loss_is_named_at_its_step_once_per_window(images, tmp_path, monkeypatch):
    """A window of 4 steps: the loss turns NaN at step 9 and is read at step 12 (the epoch's end), yet
    the error names step 9 and the last good checkpoint is kept; summary.json holds the good run."""
    train.main(argv(images, tmp_path, "train.epochs=1", "log.every_steps=4"))
    last = tmp_path / "demo" / "checkpoint-last.pth"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    summary = json.loads((tmp_path / "demo" / SUMMARY_FILE).read_text())
    assert summary["steps"] == 6 and summary["windows"] == 2 and summary["images_per_s"] > 0
    assert 0 <= summary["data_wait"] < 1

    real_loss = MaskedAutoencoderViT.forward_loss
    calls = []

    def loss_turns_nan(self, imgs, pred, mask):
        calls.append(1)
        loss = real_loss(self, imgs, pred, mask)
        return loss * float("nan") if len(calls) >= 3 else loss  # from the resumed run's 3rd step: 9

    monkeypatch.setattr(MaskedAutoencoderViT, "forward_loss", loss_turns_nan)
    with pytest.raises(SystemExit, match="loss is nan at step 9"):
        train.main(argv(images, tmp_path, "train.epochs=2", "log.every_steps=4"))
    assert len(calls) == 6  # the window ran to its end before the read
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


def test_no_checkpoint_files_with_checkpoint_every_zero(images, tmp_path):
    """train.checkpoint_every=0 (the GPU check's end-to-end runs): no checkpoint file, the summary."""
    train.main(argv(images, tmp_path, "train.epochs=2", "train.checkpoint_every=0"))
    assert not list((tmp_path / "demo").glob("*.pth"))
    assert json.loads((tmp_path / "demo" / SUMMARY_FILE).read_text())["steps"] == 12


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_side_stream_batches_match_the_default_streams(images, device):
    """The torch loader makes each batch on a side stream (a no-op on the CPU): the same batches, in
    the same order and with the same resume point, as BaseLoader's own iteration on the default
    stream, even while the default stream is busy when a batch is handed over."""
    from pipelines import LoaderConfig, build_loader
    from pipelines.base import BaseLoader

    cfg = LoaderConfig(data=str(images), img_size=32, patch_size=4, batch_size=8, workers=0, device=device)
    loader = build_loader(cfg)
    busy = torch.randn((2048, 2048) if device == "cuda" else (64, 64), device=device)
    side = []
    for batch in loader:
        busy = busy @ busy / busy.norm()  # queued on the default stream before the batch is used
        side.append({key: value.clone() for key, value in batch.items()})
        assert loader.state_dict() == {"epoch": 0, "samples": 8 * len(side)}  # the resume point: no run-ahead
    plain = list(BaseLoader.__iter__(loader))
    assert len(side) == len(plain) == 6
    for ours, theirs in zip(side, plain, strict=True):
        for key in ("images", "mask", "labels"):
            assert torch.equal(ours[key], theirs[key]), key
