"""MAE model: ViT encoder on the visible patches, light decoder, public-MAE parameter names.

The torch parts load on first use (PEP 562), so `model.config` (the config section), `model.presets`
and `python -m model.export --help` import without torch.
"""

from importlib import import_module

from model.config import ModelConfig

_LAZY = {
    **dict.fromkeys(("MaskedAutoencoderViT", "build_mae", "mask_to_ids"), "model.mae"),
    **dict.fromkeys(("CheckpointError", "build_timm_encoder", "export_encoder", "load_encoder", "load_mae",
                     "read_checkpoint"), "model.checkpoint"),
    "PRESETS": "model.presets",
}
__all__ = ["ModelConfig", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(import_module(_LAZY[name]), name)
