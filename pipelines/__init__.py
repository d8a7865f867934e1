"""Image loaders behind one switch (`loader`: torch | dali | ffcv), each yielding the ColorMAE mask.

Every batch is a dict: ``images`` float32 (B, 3, S, S) normalised with the ImageNet mean/std,
``mask`` bool (B, G*G) with True = hidden (None when the mask stage is off) and ``labels`` int64
(B,), all on `cfg.device`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from .base import LOADERS, check_config
from .manifest import Manifest, scan

__all__ = ["LOADERS", "Loader", "LoaderConfig", "Manifest", "build_loader", "scan"]


@dataclass
class LoaderConfig:
    loader: str = "torch"  # torch | dali | ffcv
    data: str = ""  # class-folder root (the train/ or val/ split folder itself)
    ffcv_path: str | None = None  # .beton for the ffcv loader (built from `data` when None)
    img_size: int = 224
    patch_size: int = 16
    batch_size: int = 64  # per rank
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    train: bool = True  # RandomResizedCrop(0.2-1) + flip, else resize + centre crop
    mask: str | None = "green"  # mask schedule; None = no mask stage
    mask_ratio: float = 0.75
    mask_bank: str | None = None  # the authors' npz pattern file
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # "cpu" or "cuda:N"
    drop_last: bool | None = None  # default: train


class Loader(Protocol):
    num_skipped: int
    classes: list[str]

    def __iter__(self) -> Iterator[dict]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def build_loader(cfg: LoaderConfig) -> Loader:
    """Validate `cfg` and build the chosen backend (which scans the data folder: cached manifest)."""
    check_config(cfg)
    if cfg.loader == "ffcv":
        from .ffcv_loader import FFCVLoader as Backend
    elif cfg.loader == "dali":
        from .dali_loader import DALILoader as Backend
    else:
        from .torch_loader import TorchLoader as Backend
    return Backend(cfg)
