"""The FFCV backend: a writer (class folder -> .beton) and an ffcv Loader; the mask is appended
after the batch reaches the device.

Sample order comes from the shared (seed, epoch) permutation and rank shard (`base.shard`), handed
to ffcv as a TraversalOrder, so all three backends give each rank the same files and no process
group is needed. ffcv draws its crops and flips from numba's unseeded RNG: mid-epoch resume
fast-forwards (decodes and drops the consumed batches), so order and masks continue exactly but
the augmentation of the remaining batches is redrawn.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader
from ffcv.reader import Reader
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder
from ffcv.writer import DatasetWriter
from PIL import Image

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAIN_RATIO,
    TRAIN_SCALE,
    BaseLoader,
    epoch_order,
    eval_crop_fraction,
    normalize,
    shard,
)
from .manifest import Manifest, exclusive, scan

log = logging.getLogger(__name__)
WRITE_MODES = ("raw", "jpg", "smart", "proportion")


class _ManifestImages:
    """(RGB PIL image, label) pairs of the manifest's good files, as ffcv's writer wants them."""

    def __init__(self, manifest: Manifest):
        self.files, self.labels = manifest.files, manifest.labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.files[index]) as img:
            return img.convert("RGB"), self.labels[index]


def write_beton(
    manifest: Manifest,
    out: str | os.PathLike,
    *,
    max_resolution: int = 512,
    jpeg_quality: int = 90,
    write_mode: str = "jpg",
    workers: int | None = None,
) -> Path:
    """Write the manifest's good files to `out` (.beton) plus `out`.json with classes and skips."""
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode={write_mode!r}: allowed values are {', '.join(WRITE_MODES)}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={jpeg_quality} must be in [1, 100]")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    image = RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    writer = DatasetWriter(str(tmp), {"image": image, "label": IntField()}, num_workers=workers or -1)
    writer.from_indexed_dataset(_ManifestImages(manifest))
    meta = {"classes": manifest.classes, "num_skipped": manifest.num_skipped}
    Path(f"{out}.json").write_text(json.dumps(meta))
    os.replace(tmp, out)
    return out


def write_in_subprocess(src: Path, out: Path, workers: int) -> None:
    """`python -m pipelines.prepare ffcv` in a fresh process: ffcv's writer forks workers, which is
    unsafe once this process runs decoder threads (torch, DALI, numba)."""
    log.warning("writing %s from %s (first use of the ffcv loader on this folder)", out, src)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "pipelines.prepare", "ffcv", "--src", str(src), "--out", str(out)]
    subprocess.run([*command, "--workers", str(workers or os.cpu_count())], check=True, env=env)
    log.warning("wrote %s (%.1f MB); data.ffcv_path=PATH or COLORMAE_CACHE=DIR puts .beton files on "
                "another disk", out, out.stat().st_size / 2**20)


class SharedOrder(TraversalOrder):
    """This rank's shard of the shared (seed, epoch) order; ffcv's Loader calls the instance."""

    def __init__(self, size: int, cfg, equal: bool):
        self.size, self.cfg, self.equal = size, cfg, equal

    def __call__(self, _loader: Loader) -> SharedOrder:
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        order = epoch_order(self.size, seed=self.cfg.seed, epoch=epoch, shuffle=self.cfg.train)
        order = shard(order, self.cfg.rank, self.cfg.world_size, equal=self.equal)
        return order.astype(np.uint64)  # ffcv's compiled pipeline is typed for uint64 indices


class FFCVLoader(BaseLoader):
    """ffcv Loader over `cfg.ffcv_path` (written there from `cfg.data` when missing), or over a .beton
    written once from `cfg.data` into its cache folder (named by the manifest's signature, so a
    changed folder gets a new file)."""

    def __init__(self, cfg):
        manifest = scan(cfg.data, workers=cfg.workers or None) if cfg.data else None
        path = Path(cfg.ffcv_path) if cfg.ffcv_path else None
        if path is None:
            if manifest is None:
                raise ValueError("the ffcv loader needs `data` (a class folder) or `ffcv_path` (a .beton)")
            path = manifest.cache_dir / f"ffcv-{manifest.signature()}.beton"
        if not path.exists():
            if manifest is None:
                raise FileNotFoundError(f"ffcv_path {path} does not exist and `data` is not set to write it")
            with exclusive(path.with_name(path.name + ".lock")):  # one writer among concurrent ranks
                if not path.exists():
                    write_in_subprocess(manifest.root, path, cfg.workers)
        super().__init__(cfg, manifest)
        meta = json.loads(Path(f"{path}.json").read_text()) if Path(f"{path}.json").exists() else {}
        self.classes = self.classes or meta.get("classes", [])
        self.num_skipped = self.num_skipped if manifest else meta.get("num_skipped", 0)

        size = cfg.img_size
        if cfg.train:
            image_ops = [RandomResizedCropRGBImageDecoder((size, size), scale=TRAIN_SCALE, ratio=TRAIN_RATIO)]
            image_ops.append(RandomHorizontalFlip())
        else:
            image_ops = [CenterCropRGBImageDecoder((size, size), ratio=eval_crop_fraction(size))]
        if self.device.type == "cuda":  # uint8 to the GPU, normalised there (base.normalize)
            image_ops += [ToTensor(), ToDevice(self.device, non_blocking=True), ToTorchImage()]
            label_ops = [IntDecoder(), ToTensor(), Squeeze(), ToDevice(self.device, non_blocking=True)]
        else:  # normalised by ffcv's compiled lookup table, in its worker threads
            mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
            image_ops += [NormalizeImage(mean, std, np.float32), ToTensor(), ToTorchImage()]
            label_ops = [IntDecoder(), ToTensor(), Squeeze()]
        num_samples = Reader(str(path)).num_samples
        self.loader = Loader(
            str(path),
            batch_size=cfg.batch_size,
            num_workers=max(cfg.workers, 1),
            order=SharedOrder(num_samples, cfg, equal=self.drop_last),
            drop_last=self.drop_last,
            pipelines={"image": image_ops, "label": label_ops},
        )

    def __len__(self) -> int:
        return len(self.loader)

    def _batches(self, skip: int):
        self.loader.next_epoch = self.epoch
        for index, (images, labels) in enumerate(self.loader):
            if index < skip:
                continue
            labels = labels.to(self.device, dtype=torch.int64).view(-1)
            # ffcv refills its batch buffers a few batches later: hand out a tensor of our own
            images = normalize(images, self.device) if self.device.type == "cuda" else images.clone()
            yield images, labels, self.masks(self.epoch, index, len(labels)) if self.masks else None
