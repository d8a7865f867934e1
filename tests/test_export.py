"""model.export: safetensors + model card that timm loads strictly, from a checkpoint or an MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import timm
import torch
from safetensors.torch import load_file

import tracking
from model import build_mae, load_encoder
from model.export import CARD_FILE, WEIGHTS_FILE, export_checkpoint, export_run, main, read_encoder

ROOT = Path(__file__).resolve().parent.parent
ARGS = {"img_size": 32, "depth": 2, "decoder_depth": 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A train.py-shaped checkpoint of a small demo MAE with random (non-initial) weights."""
    torch.manual_seed(0)
    mae = build_mae("demo", **ARGS)
    with torch.no_grad():
        for tensor in mae.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth"
    torch.save({"model": mae.state_dict(), "model_args": mae.model_args, "epoch": 3, "step": 30,
                "config": {"train": {"batch_size": 16}, "mask": {"schedule": "green", "ratio": 0.75}},
                "mlflow_run_id": "abc123"}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One runs root (one SQLite store, whose set-up takes seconds) for the module."""
    return tmp_path_factory.mktemp("runs")


def timm_from_export(folder: Path) -> torch.nn.Module:
    """What a user without this repo does: timm's named architecture, the card's sizes, strict load."""
    card = json.loads((folder / CARD_FILE).read_text())
    vit = timm.create_model(card["timm_model"], pretrained=False, **card["timm_kwargs"])
    vit.load_state_dict(load_file(folder / WEIGHTS_FILE), strict=True)
    return vit.eval()


def same_features(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(a.eval()(images), b.eval()(images), atol=1e-6)


def test_checkpoint_export_loads_strictly_in_timm_and_through_load_encoder(checkpoint, tmp_path):
    out = export_checkpoint(checkpoint, tmp_path / "export", final_loss=0.5, fingerprint="f00d")
    card = json.loads((out / CARD_FILE).read_text())
    assert card["timm_model"] == "vit_tiny_patch16_224" and card["preset"] == "demo"
    sizes = (card["image_size"], card["patch_size"], card["epochs"], card["images_seen"])
    assert sizes == (32, 4, 3, 30 * 16)
    assert (card["mask_schedule"], card["final_loss"], card["pretraining_run_id"], card["fingerprint"]) == (
        "green", 0.5, "abc123", "f00d")
    reference = load_encoder(checkpoint)  # the checkpoint path the repo always had
    assert same_features(timm_from_export(out), reference)
    assert same_features(load_encoder(out), reference)  # load_encoder accepts the exported folder
    assert not any(k.startswith("decoder") for k in load_file(out / WEIGHTS_FILE))


def test_weights_logged_to_mlflow_read_back_and_export_by_run_id(checkpoint, runs, tmp_path):
    uri = tracking.default_tracking_uri(runs)
    tracker = tracking.Tracker(uri, "export", offline_dir=tmp_path / "run")
    folder = export_checkpoint(checkpoint, tmp_path / "logged")
    model_id = tracker.log_model_folder(folder, "encoder", step=30, tags={"epoch": 3})
    tracker.close()

    client = tracking.open_client(uri)
    [model] = client.search_logged_models([tracker.experiment_id])
    assert model.model_id == model_id and model.source_run_id == tracker.run_id
    assert [o.model_id for o in client.get_run(tracker.run_id).outputs.model_outputs] == [model_id]
    downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                          dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    assert same_features(timm_from_export(downloaded), load_encoder(checkpoint))

    out = export_run(tracker.run_id, uri, tmp_path / "by-run")
    assert same_features(timm_from_export(out), load_encoder(checkpoint))


def test_run_without_logged_encoder_exports_its_checkpoint_relative_to_the_runs_root(checkpoint, runs,
                                                                                    tmp_path):
    (runs / "demo").mkdir(parents=True)
    (runs / "demo" / "checkpoint-last.pth").write_bytes(checkpoint.read_bytes())
    uri = tracking.default_tracking_uri(runs)
    tracker = tracking.Tracker(uri, "fallback", tags={"checkpoint": "demo/checkpoint-last.pth"},
                               offline_dir=tmp_path / "run")
    tracker.close("KILLED")
    state, card = read_encoder(export_run(tracker.run_id, uri, tmp_path / "out"))
    assert card["epochs"] == 3 and set(state) == set(load_encoder(checkpoint).state_dict())


def test_export_command_line_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"error: checkpoint .*missing\.pth does not exist"):
        main(["--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="is not an exported encoder"):
        load_encoder(tmp_path)
    usage = subprocess.run([sys.executable, "-m", "model.export", "--help"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert usage.startswith("usage: python -m model.export")
