"""MAE model: ViT encoder on the visible patches, light decoder, public-MAE parameter names."""

from model.checkpoint import (
    CheckpointError,
    build_timm_encoder,
    export_encoder,
    load_encoder,
    load_mae,
    read_checkpoint,
)
from model.mae import PRESETS, MaskedAutoencoderViT, build_mae

__all__ = ["PRESETS", "CheckpointError", "MaskedAutoencoderViT", "build_mae", "build_timm_encoder",
           "export_encoder", "load_encoder", "load_mae", "read_checkpoint"]
