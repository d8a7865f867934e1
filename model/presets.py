"""MAE sizes by name, and the defaults every preset starts from (plain data: no torch, so the command
lines can offer the names as choices before torch loads)."""

from typing import Any

_PAPER_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
_LIGHT_DECODER = {"decoder_embed_dim": 256, "decoder_depth": 4, "decoder_num_heads": 8}

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3,
             "decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4},
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3, **_LIGHT_DECODER},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6, **_LIGHT_DECODER},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12, **_PAPER_DECODER},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, **_PAPER_DECODER},
    "vit_huge": {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, **_PAPER_DECODER},
}
DEFAULTS: dict[str, Any] = {"img_size": 224, "patch_size": 16, "in_chans": 3, "mlp_ratio": 4.0,
                            "norm_pix_loss": True}
