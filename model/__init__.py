"""MAE model: ViT encoder on the visible patches, light decoder, public-MAE parameter names."""

from model.checkpoint import build_timm_encoder, export_encoder, load_encoder, load_mae
from model.mae import PRESETS, MaskedAutoencoderViT, build_mae

__all__ = ["PRESETS", "MaskedAutoencoderViT", "build_mae", "build_timm_encoder",
           "export_encoder", "load_encoder", "load_mae"]
