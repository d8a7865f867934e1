"""model.export: a timm / Hugging Face folder that timm loads with the training preprocessing, and the
MLflow pyfunc model around it (the store's side is in test_mlflow_models.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from model import build_mae, load_encoder
from model.checkpoint import CARD_FILE, WEIGHTS_FILE
from model.export import encoder_name, export, save_mlflow_model
from model.pretrained import read_pretrained
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD, eval_crop_fraction

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
def exported(checkpoint, tmp_path_factory) -> Path:
    return export(str(checkpoint), tmp_path_factory.mktemp("export") / "demo")


def features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_export_is_a_timm_folder_with_the_training_preprocessing(checkpoint, exported):
    assert {p.name for p in exported.iterdir()} == {"config.json", WEIGHTS_FILE, CARD_FILE, "README.md"}
    assert {p.stat().st_mode & 0o777 for p in exported.iterdir()} == {0o644}  # shareable
    vit = timm.create_model(f"local-dir:{exported}", pretrained=True)  # timm alone, by the folder
    config = timm.data.resolve_data_config(model=vit)
    assert config == {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": list(IMAGENET_MEAN),
                      "std": list(IMAGENET_STD), "crop_pct": eval_crop_fraction(32), "crop_mode": "center"}
    reference = load_encoder(checkpoint)  # the project's own reader of the training checkpoint
    assert torch.allclose(features(vit, IMAGES), features(reference, IMAGES), atol=1e-6)
    mae = build_mae("demo", **ARGS)
    mae.load_state_dict(torch.load(checkpoint)["model"])
    with torch.no_grad():  # the cls token after the final norm, as the MAE computes it
        assert torch.allclose(features(vit, IMAGES), mae.eval().forward_features(IMAGES)[:, 0], atol=1e-5)
    assert not any(k.startswith("decoder") for k in load_file(exported / WEIGHTS_FILE))


def test_the_card_names_the_real_sizes_and_the_training(exported):
    card = json.loads((exported / CARD_FILE).read_text())
    config = json.loads((exported / "config.json").read_text())
    assert card["name"] == config["model_name"] == "vit_w192_d2_patch4_32"
    assert (card["epochs"], card["images_seen"], card["mask_schedule"], card["pretraining_run_id"]) == (
        3, 30 * 16, "green", "abc123")
    assert "# Model card for vit_w192_d2_patch4_32" in (exported / "README.md").read_text()
    assert encoder_name({"preset": "vit_base", "img_size": 224}) == "vit_base_patch16_224"
    assert encoder_name({"preset": "vit_base", "img_size": 224, "depth": 2}) == "vit_w768_d2_patch16_224"
    assert encoder_name({"preset": "demo", "img_size": 32}) == "vit_w192_d6_patch4_32"


def test_mlflow_model_predicts_the_encoder_features_and_reads_back(exported, tmp_path):
    path = save_mlflow_model(exported, tmp_path / "mlflow-model")
    model = mlflow.pyfunc.load_model(str(path))
    assert model.metadata.metadata["mean"] == list(IMAGENET_MEAN)
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 3, 32, 32)
    predicted = model.predict(IMAGES.numpy())
    vit = timm.create_model(f"local-dir:{exported}", pretrained=True)
    assert predicted.dtype == np.float32 and np.allclose(predicted, features(vit, IMAGES).numpy(), atol=1e-6)
    again = read_pretrained(path)  # the evaluations and the export read the MLflow model folder too
    assert again["epoch"] == 3 and torch.equal(again["model"]["cls_token"], load_file(
        exported / WEIGHTS_FILE)["cls_token"])


def test_export_command_line_errors_are_one_line(tmp_path):
    missing = tmp_path / "missing.pth"
    done = subprocess.run([sys.executable, "-m", "model.export", "--checkpoint", str(missing), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (2, f"error: checkpoint {missing} does not exist\n")
    with pytest.raises(FileNotFoundError, match="is not an exported encoder"):
        load_encoder(tmp_path)
    usage = subprocess.run([sys.executable, "-m", "model.export", "--help"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout
    assert usage.startswith("usage: python -m model.export")
