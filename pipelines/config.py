"""The loader's configuration: the `data:` section of a training config and the per-rank LoaderConfig.

    loader = build_loader(LoaderConfig.from_sections(cfg.data, cfg.mask, patch_size=16, batch_size=512))

`DataConfig` is what a user chooses in YAML; `LoaderConfig` is what one rank's loader runs with
(the data and mask sections plus the model's patch size, the per-rank batch, rank and device).
Imports nothing heavy, so `train.py --print-config` reads the schema before torch loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .backends import BACKENDS, LOADERS

if TYPE_CHECKING:
    from noise.config import MaskConfig


def default_workers() -> int:
    """Loader workers (DALI threads) per rank: the CPUs this process may use (its affinity, which a
    cluster's scheduler sets), shared by the node's ranks (LOCAL_WORLD_SIZE, set by torchrun); >= 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)))


def _shared_problems(loader: str, workers: int | None) -> list[str]:
    """The checks of the fields the data section and LoaderConfig share (named without a section)."""
    problems = []
    if loader not in LOADERS:
        problems.append(f"loader '{loader}' is unknown; choose one of {', '.join(LOADERS)}")
    if workers is not None and workers < 0:
        problems.append(f"workers must be >= 0 or null, got {workers}")
    return problems


@dataclass
class DataConfig:
    """The `data:` section: which images, read by which loader."""

    loader: str = "torch"  # torch | dali | ffcv
    path: str = "data/imagenet/train"  # class-folder root of the training split
    ffcv_path: str | None = None  # .beton for the ffcv loader (built from `path` when None)
    img_size: int = 224
    workers: int | None = None  # loader workers per rank; None = usable CPUs / ranks on the node
    max_pixels: int | None = None  # larger images are skipped by the scan; None = Pillow's bomb limit

    @property
    def beton(self) -> str | None:
        """The existing .beton the ffcv loader reads instead of scanning `path`, if any."""
        has_beton = self.loader == "ffcv" and self.ffcv_path and Path(self.ffcv_path).is_file()
        return self.ffcv_path if has_beton else None

    def check(self) -> list[str]:
        """Problems, one line each naming its key (data.loader, data.path, data.workers)."""
        problems = [f"data.{problem}" for problem in _shared_problems(self.loader, self.workers)]
        if self.max_pixels is not None and self.max_pixels < 1:
            problems.append(f"data.max_pixels must be at least 1 or null, got {self.max_pixels}")
        if self.beton:
            return problems
        if not Path(self.path).is_dir():
            problems.append(f"data.path '{self.path}' is not a folder (expected class sub-folders of images)")
        elif not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(self.path)):
            problems.append(f"data.path '{self.path}' has no class sub-folders "
                            f"(expected {self.path}/<class>/<image>)")
        return problems


@dataclass
class LoaderConfig:
    """What one rank's loader runs with (see `build_loader`)."""

    loader: str = "torch"  # torch | dali | ffcv
    data: str = ""  # class-folder root (the train/ or val/ split folder itself)
    ffcv_path: str | None = None  # .beton for the ffcv loader (built from `data` when None)
    img_size: int = 224
    patch_size: int = 16
    batch_size: int = 64  # per rank
    workers: int = field(default_factory=default_workers)
    train: bool = True  # RandomResizedCrop(0.2-1) + flip, else resize + centre crop
    schedule: str | None = "green"  # the mask schedule (mask.schedule); None = no mask stage
    mask_ratio: float = 0.75
    mask_bank: str | None = None  # the authors' npz pattern file
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # "cpu" or "cuda:N"
    drop_last: bool | None = None  # default: train
    max_pixels: int | None = None  # larger images are skipped by the scan; None = Pillow's bomb limit

    @classmethod
    def from_sections(cls, data: DataConfig, mask: MaskConfig | None = None, **runtime) -> LoaderConfig:
        """One rank's loader config from the data (and mask) sections; `runtime`: the remaining fields
        (patch_size, batch_size, seed, rank, world_size, device, train...). No mask: no mask stage."""
        masking = {"schedule": None} if mask is None else {
            "schedule": mask.schedule, "mask_ratio": mask.ratio, "mask_bank": mask.bank}
        workers = {} if data.workers is None else {"workers": data.workers}
        return cls(loader=data.loader, data=data.path, ffcv_path=data.ffcv_path, img_size=data.img_size,
                   max_pixels=data.max_pixels, **workers, **masking, **runtime)

    def check(self) -> None:
        """Raise ValueError naming each bad field and the allowed values."""
        import torch

        from noise import check_ratio

        problems = _shared_problems(self.loader, self.workers)
        if self.img_size <= 0 or self.patch_size <= 0 or self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} must be a multiple of "
                            f"patch_size={self.patch_size} (> 0)")
        if self.batch_size <= 0:
            problems.append(f"batch_size={self.batch_size} must be positive")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        device = torch.device(self.device)
        if device.type not in ("cpu", "cuda"):
            problems.append(f"device={self.device!r}: allowed values are 'cpu' and 'cuda[:N]'")
        elif self.loader in BACKENDS and device.type not in BACKENDS[self.loader].devices:
            problems.append(f"device={self.device!r}: the {self.loader} loader runs on "
                            f"{' or '.join(BACKENDS[self.loader].devices)} only")
        elif device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"device={self.device!r} but no CUDA device is available; use device='cpu'")
        if self.schedule:
            try:
                check_ratio(self.mask_ratio)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
