"""Image loaders behind one switch (`loader`: torch | dali | ffcv), each yielding the ColorMAE mask.

Every batch is a dict: ``images`` float32 (B, 3, S, S) normalised with the ImageNet mean/std,
``mask`` bool (B, G*G) with True = hidden (None when the mask stage is off) and ``labels`` int64
(B,), all on `cfg.device`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Protocol

from errors import UserError

from .backends import BACKENDS, LOADERS
from .config import DataConfig, LoaderConfig
from .manifest import Manifest, scan

__all__ = ["BACKENDS", "LOADERS", "DataConfig", "Loader", "LoaderConfig", "Manifest", "build_loader", "scan"]


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
    cfg.check()
    backend = BACKENDS[cfg.loader]
    module, name = backend.target.split(":")
    try:
        found = importlib.import_module(f".{module}", __name__)
    except ModuleNotFoundError as err:  # an optional package that `make train`'s set-up leaves out
        if (err.name or "").split(".")[0] not in {package.split(".")[0] for package in backend.packages}:
            raise
        raise UserError(f"data.loader {cfg.loader} needs the package {err.name}, which is not installed: "
                        f"make setup-gpu (or pip install 'colormae[{cfg.loader}]')") from err
    return getattr(found, name)(cfg)
