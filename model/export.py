"""Export a pretrained encoder as safetensors + a JSON model card that timm loads strictly.

    python -m model.export --checkpoint runs/demo/checkpoint-last.pth --out exported/demo
    python -m model.export --run-id 0123abcd... --mlflow-uri sqlite:///runs/mlflow.db --out exported/demo

The folder holds `model.safetensors` (timm VisionTransformer parameter names) and `model-card.json`;
`model.load_encoder(folder)` reads it back, and so does timm alone:

    card = json.load(open("exported/demo/model-card.json"))
    vit = timm.create_model(card["timm_model"], pretrained=False, **card["timm_kwargs"])
    vit.load_state_dict(safetensors.torch.load_file("exported/demo/model.safetensors"), strict=True)

`--help` answers before torch loads; mlflow loads only for --run-id.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m model.export`: --checkpoint PATH or --run-id ID, and --out DIR."""
    parser = argparse.ArgumentParser(prog="python -m model.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a train.py checkpoint (.pth)")
    source.add_argument("--run-id", help="an MLflow pretraining run id")
    parser.add_argument("--out", required=True, help="folder to write model.safetensors and model-card.json")
    parser.add_argument("--mlflow-uri", default=None,
                        help="tracking URI for --run-id (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch loads
    build_parser().parse_args()

from safetensors.torch import save_file

from model.checkpoint import CARD_FILE, ENCODER_KEYS, WEIGHTS_FILE, read_encoder, read_pretrained
from model.presets import DEFAULTS, PRESETS

# The timm architecture each preset is (the card's timm_kwargs fix image, patch size and depth).
TIMM_MODELS = {"demo": "vit_tiny_patch16_224", "vit_tiny": "vit_tiny_patch16_224",
               "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224",
               "vit_large": "vit_large_patch16_224", "vit_huge": "vit_huge_patch14_224"}


def model_card(model_args: dict[str, Any], *, config: dict | None, epoch: int, step: int,
               final_loss: float | None, run_id: str | None, fingerprint: str | None) -> dict[str, Any]:
    """What the weights are: architecture (MAE and timm), recipe, training progress and provenance."""
    preset = model_args.get("preset", "vit_base")
    arch = {**DEFAULTS, **PRESETS.get(preset, {}), **model_args}
    config = config or {}
    batch_size, mask = config.get("train", {}).get("batch_size"), config.get("mask", {})
    return {
        "format": "colormae-encoder-v1", "weights": WEIGHTS_FILE, "preset": preset,
        "image_size": arch["img_size"], "patch_size": arch["patch_size"],
        "mask_schedule": mask.get("schedule"), "mask_ratio": mask.get("ratio"),
        "epochs": epoch, "steps": step, "images_seen": step * batch_size if batch_size else None,
        "final_loss": final_loss, "pretraining_run_id": run_id, "fingerprint": fingerprint,
        "model_args": dict(model_args), "timm_model": TIMM_MODELS.get(preset, "vit_base_patch16_224"),
        "timm_kwargs": {k: arch[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads",
                                             "mlp_ratio")} | {"num_classes": 0, "global_pool": "token"},
    }


def write_encoder(out_dir: str | Path, mae_state: dict, card: dict[str, Any]) -> Path:
    """Write the encoder part of an MAE state dict as safetensors, and the card; returns the folder."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder = {k: v.detach().cpu().contiguous() for k, v in mae_state.items() if k.startswith(ENCODER_KEYS)}
    save_file(encoder, out / WEIGHTS_FILE, metadata={"format": "pt"})
    (out / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return out


def export_checkpoint(path: str | Path, out_dir: str | Path, *, final_loss: float | None = None,
                      fingerprint: str | None = None) -> Path:
    """A train.py checkpoint -> exported folder."""
    ckpt = read_pretrained(path)
    card = model_card(ckpt["model_args"], config=ckpt.get("config"), epoch=ckpt.get("epoch", 0),
                      step=ckpt.get("step", 0), final_loss=final_loss, run_id=ckpt.get("mlflow_run_id"),
                      fingerprint=fingerprint)
    return write_encoder(out_dir, ckpt["model"], card)


def export_run(run_id: str, uri: str, out_dir: str | Path) -> Path:
    """The encoder a pretraining run logged (its latest logged model), else its last checkpoint."""
    import mlflow
    from mlflow.exceptions import MlflowException

    import tracking

    client = tracking.open_client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"no run {run_id} in {uri}") from err
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    if models:
        latest = max(models, key=lambda m: m.creation_timestamp)
        with tempfile.TemporaryDirectory() as tmp:
            state, card = read_encoder(mlflow.artifacts.download_artifacts(
                artifact_uri=latest.artifact_location, dst_path=tmp, tracking_uri=uri))
        return write_encoder(out_dir, state, card)
    checkpoint = run.data.tags.get("checkpoint")
    if not checkpoint or not uri.startswith("sqlite:///"):
        raise ValueError(f"run {run_id} logged no encoder and its checkpoint cannot be found from {uri}")
    runs_root = Path(uri.removeprefix("sqlite:///")).parent
    loss = run.data.metrics.get("loss")
    return export_checkpoint(runs_root / checkpoint, out_dir, final_loss=loss,
                             fingerprint=run.data.tags.get("colormae.fingerprint"))


def main(argv: list[str] | None = None) -> Path:
    """Command line: --checkpoint PATH or --run-id ID -> --out DIR."""
    args = build_parser().parse_args(argv)
    try:
        if args.checkpoint:
            out = export_checkpoint(args.checkpoint, args.out)
        else:
            import tracking

            out = export_run(args.run_id, tracking.resolve_uri(args.mlflow_uri, "runs"), args.out)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"exported the encoder to {out}")
    return out


if __name__ == "__main__":
    main()
