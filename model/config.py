"""The `model:` section of a training config, declared beside the model it builds.

Imports nothing heavy (torch loads inside `check`), so `train.py --print-config` reads the schema
before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """The `model:` section: which MAE to build."""

    preset: str = "vit_base"  # a key of model.PRESETS
    norm_pix_loss: bool = True  # per-patch normalised pixel targets
    args: dict = field(default_factory=dict)  # extra build_mae keyword arguments, e.g. {depth: 2}

    def kwargs(self, img_size: int) -> dict:
        """Keyword arguments for `build_mae(self.preset, **kwargs)` at this image size."""
        return {"img_size": img_size, "norm_pix_loss": self.norm_pix_loss, **self.args}

    def check(self, img_size: int) -> list[str]:
        """Problems, one line each: an unknown preset, or an architecture that does not build."""
        import torch

        from model.mae import PRESETS, build_mae

        if self.preset not in PRESETS:
            return [f"model.preset '{self.preset}' is unknown; choose one of {sorted(PRESETS)}"]
        try:  # on the meta device: checks the architecture (patch divides image, heads divide width)
            with torch.device("meta"):
                build_mae(self.preset, **self.kwargs(img_size))
        except (ValueError, TypeError) as err:
            return [f"model (preset {self.preset}, data.img_size {img_size}, args {self.args}): {err}"]
        return []
