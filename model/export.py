"""Export a pretrained encoder in timm / Hugging Face layout, and as an MLflow model around that folder.

    python -m model.export --checkpoint runs/demo/checkpoint-last.pth --out exported/demo
    python -m model.export --checkpoint models:/colormae-encoder/1 --out exported/demo
    python -m model.export --checkpoint runs:/<run id> --out exported/demo    (the run's last encoder)

The folder is what timm's `save_for_hf` writes: `config.json` (the timm builder, the arguments that
give the real sizes, and a `pretrained_cfg` holding the training preprocessing: input size, mean and
std, bicubic interpolation, crop_pct) and `model.safetensors`; beside them `model-card.json` (the
training run: preset, config, steps, final loss, provenance) and a README.md from timm's card writer.
timm alone reads it:

    vit = timm.create_model("local-dir:exported/demo", pretrained=True)
    preprocess = timm.data.create_transform(**timm.data.resolve_data_config(model=vit))

`--help` answers before torch loads.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.export`: --checkpoint SOURCE, --out DIR, --mlflow-uri."""
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a train.py checkpoint (.pth), an export folder, models:/NAME/VERSION, "
                             "models:/NAME@ALIAS or runs:/RUN_ID")
    parser.add_argument("--out", required=True, help="folder to write the export to")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking URI for models:/ and runs:/ (default: MLFLOW_TRACKING_URI, else "
                             "runs/mlflow.db)")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch loads
    build_parser().parse_args()

import numpy as np
import timm
from timm.models import save_for_hf
from timm.models._hub import generate_readme

from errors import run_cli
from model.checkpoint import CARD_FILE, ENCODER_KEYS
from model.presets import DEFAULTS, PRESETS
from model.pretrained import read_pretrained
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD, eval_crop_fraction

# The timm builder of each preset's width and heads; config.json's model_args give the real sizes.
TIMM_BUILDERS = {"demo": "vit_tiny_patch16_224", "vit_tiny": "vit_tiny_patch16_224",
                 "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224",
                 "vit_large": "vit_large_patch16_224", "vit_huge": "vit_huge_patch14_224"}
ARCH_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
PYFUNC_FILE = Path(__file__).with_name("pyfunc.py")  # the MLflow model's code (models from code)


def architecture(model_args: dict[str, Any]) -> dict[str, Any]:
    """The encoder's full sizes: the defaults, its preset, then its own arguments."""
    return {**DEFAULTS, **PRESETS.get(model_args.get("preset", "vit_base"), {}), **model_args}


def encoder_name(model_args: dict[str, Any]) -> str:
    """A timm-style name that states the real sizes: vit_base_patch16_224 for the paper's ViT-B, and
    vit_w192_d6_patch4_32 (width, depth) for an encoder no timm family describes (the demo)."""
    arch, preset = architecture(model_args), model_args.get("preset", "vit_base")
    standard = {**DEFAULTS, **PRESETS.get(preset, {})}
    is_family = preset in TIMM_BUILDERS and preset != "demo" and all(
        arch[k] == standard[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio"))
    width = preset if is_family else f"vit_w{arch['embed_dim']}_d{arch['depth']}"
    return f"{width}_patch{arch['patch_size']}_{arch['img_size']}"


def data_config(img_size: int) -> dict[str, Any]:
    """The preprocessing of training and evaluation (pipelines.base) in timm's pretrained_cfg terms:
    ImageNet mean/std, bicubic, and the evaluation's centre crop."""
    return {"input_size": (3, img_size, img_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
            "interpolation": "bicubic", "crop_pct": eval_crop_fraction(img_size), "crop_mode": "center"}


def model_card(model_args: dict[str, Any], *, config: dict | None, epoch: int, step: int,
               final_loss: float | None, run_id: str | None, fingerprint: str | None) -> dict[str, Any]:
    """What the weights are: name and architecture, recipe, training progress and provenance."""
    arch, config = architecture(model_args), config or {}
    batch_size, mask = config.get("train", {}).get("batch_size"), config.get("mask", {})
    return {
        "format": "colormae-encoder-v2", "name": encoder_name(model_args),
        "preset": model_args.get("preset", "vit_base"), "image_size": arch["img_size"],
        "patch_size": arch["patch_size"], "mask_schedule": mask.get("schedule"),
        "mask_ratio": mask.get("ratio"),
        "epochs": epoch, "steps": step, "images_seen": step * batch_size if batch_size else None,
        "final_loss": final_loss, "pretraining_run_id": run_id, "fingerprint": fingerprint,
        "model_args": dict(model_args), "config": config,
    }


def timm_encoder(model_args: dict[str, Any]) -> timm.models.VisionTransformer:
    """The encoder built by timm's factory (which records the arguments save_for_hf writes)."""
    arch = architecture(model_args)
    builder = TIMM_BUILDERS.get(model_args.get("preset", "vit_base"), "vit_base_patch16_224")
    return timm.create_model(builder, pretrained=False, num_classes=0, global_pool="token",
                             **{k: arch[k] for k in ARCH_KEYS})


def write_encoder(out_dir: str | Path, mae_state: dict, card: dict[str, Any]) -> Path:
    """The encoder part of an MAE state dict in timm / Hugging Face layout, with the card; returns the
    folder. Files are world-readable (0644): the folder is meant to be shared."""
    out = Path(out_dir)
    vit = timm_encoder(card["model_args"])
    vit.load_state_dict({k: v.detach().cpu() for k, v in mae_state.items() if k.startswith(ENCODER_KEYS)})
    pretrained_cfg = {**data_config(card["image_size"]), "tag": "colormae", "license": None}
    save_for_hf(vit, out, model_config={"model_name": card["name"], "pretrained_cfg": pretrained_cfg},
                safe_serialization=True, data_config=data_config(card["image_size"]))
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    text = generate_readme(readme(card), card["name"], task_name="image-feature-extraction")
    (out / "README.md").write_text(text)
    for path in out.iterdir():
        os.chmod(path, 0o644)
    return out


def readme(card: dict[str, Any]) -> dict[str, Any]:
    """timm's model-card fields for the README."""
    details = {"Model Type": "Image feature backbone (the encoder of a ColorMAE masked autoencoder)",
               "Image size": f"{card['image_size']} x {card['image_size']}", "Patch size": card["patch_size"],
               "Pretraining": f"{card['epochs']} epochs, {card['steps']} steps, mask {card['mask_schedule']} "
                              f"at ratio {card['mask_ratio']}, final loss {card['final_loss']}",
               "MLflow run": card["pretraining_run_id"]}
    usage = ("```python\nimport timm\n\nvit = timm.create_model('local-dir:<this folder>', pretrained=True)\n"
             "config = timm.data.resolve_data_config(model=vit)\n"
             "features = vit(timm.data.create_transform(**config)(image).unsqueeze(0))\n```\n")
    return {"description": f"ColorMAE encoder {card['name']} (preset {card['preset']}).",
            "details": details, "usage": usage, "tags": ["image-feature-extraction", "timm"]}


def save_mlflow_model(folder: str | Path, path: str | Path, mlflow_model=None) -> Path:
    """An MLflow pyfunc model at `path` around an export folder (its `encoder` artifact): `predict` maps
    a normalised float32 batch (N, 3, S, S) to (N, D) features; the metadata states the normalisation.

    mlflow_model: MLflow's Model record to fill (a logged model's id and run), else a new one.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    config = json.loads((Path(folder) / "config.json").read_text())
    cfg, width = config["pretrained_cfg"], config["num_features"]
    signature = ModelSignature(Schema([TensorSpec(np.dtype(np.float32), (-1, *cfg["input_size"]))]),
                               Schema([TensorSpec(np.dtype(np.float32), (-1, width))]))
    metadata = {"encoder": config.get("model_name"),
                **{key: cfg[key] for key in ("input_size", "mean", "std", "interpolation", "crop_pct")}}
    metadata["normalisation"] = "images scaled to [0, 1], then (x - mean) / std per channel"
    requirements = [f"{name}=={version}" for name, version in (
        ("mlflow", mlflow.__version__), ("timm", timm.__version__), ("torch", version("torch").split("+")[0]),
        ("safetensors", version("safetensors")), ("numpy", np.__version__))]
    with warnings.catch_warnings():  # MLflow's advice to add an input example: the signature is given
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        mlflow.pyfunc.save_model(path, python_model=str(PYFUNC_FILE), artifacts={"encoder": str(folder)},
                                 signature=signature, metadata=metadata,
                                 pip_requirements=requirements, mlflow_model=mlflow_model)
    return Path(path)


def export(source: str, out_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """What `read_pretrained` takes (.pth, export folder, models:/, runs:/) -> an export folder."""
    ckpt = read_pretrained(source, tracking_uri=tracking_uri)
    card = model_card(ckpt["model_args"], config=ckpt.get("config"), epoch=ckpt.get("epoch", 0),
                      step=ckpt.get("step", 0), final_loss=ckpt.get("final_loss"),
                      run_id=ckpt.get("mlflow_run_id"), fingerprint=ckpt.get("fingerprint"))
    return write_encoder(out_dir, ckpt["model"], card)


def main(argv: list[str] | None = None) -> Path:
    """Command line: --checkpoint SOURCE -> --out DIR."""
    args = build_parser().parse_args(argv)
    out = export(args.checkpoint, args.out, args.mlflow_uri)
    print(f"exported the encoder to {out}")
    return out


if __name__ == "__main__":
    run_cli(main)  # a missing or unreadable source is one line, exit 2, as for the evaluations
