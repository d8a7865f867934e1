"""The torch backend: torchvision decode and transforms (uint8 tensors) in DataLoader workers."""

from __future__ import annotations

import os
import signal
import threading
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAIN_RATIO,
    TRAIN_SCALE,
    BaseLoader,
    SideStream,
    eval_crop_side,
    normalize,
    sample_seed,
)
from .manifest import Manifest


def build_transform(img_size: int, train: bool, normalise: bool) -> v2.Compose:
    """Training: RandomResizedCrop(S, scale 0.2-1) + flip; evaluation: centre crop + resize.

    Output: uint8 (3, S, S), or float32 normalised with the ImageNet mean/std when `normalise`.
    """
    bicubic = v2.InterpolationMode.BICUBIC
    if train:
        geometry = [
            v2.RandomResizedCrop(img_size, scale=TRAIN_SCALE, ratio=TRAIN_RATIO, interpolation=bicubic),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [CenterSquare(img_size), v2.Resize((img_size, img_size), interpolation=bicubic)]
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose([*geometry, *(to_float if normalise else [])])


class CenterSquare(torch.nn.Module):
    """Centre square crop of `eval_crop_fraction` of the short side (resized to S afterwards)."""

    def __init__(self, img_size: int):
        super().__init__()
        self.img_size = img_size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        height, width = img.shape[-2:]
        side = eval_crop_side(height, width, self.img_size)
        return v2.functional.crop(img, (height - side) // 2, (width - side) // 2, side, side)


def obey_only_parent_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the trainer, which finishes its step and checkpoints; only
    their parent (the DataLoader shutting them down, multiprocessing at exit) can still stop them.

    A scheduler that signals the whole process group (SLURM's scancel) would otherwise kill the
    workers first, and the DataLoader would abort the very step that should end with a save. Plain
    SIG_IGN is not enough: the parent's terminate() at interpreter exit would then wait forever.
    The signals are blocked and read by a thread that knows who sent them.
    """
    stop_signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # threads started later inherit the mask
    parent = os.getppid()

    def watch() -> None:
        while True:
            info = signal.sigwaitinfo(stop_signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="stop-signal-watch", daemon=True).start()


class ManifestDataset(Dataset):
    """Items are keyed by (epoch, index); random transforms are seeded from (seed, epoch, index)."""

    def __init__(self, manifest: Manifest, transform: v2.Compose, seed: int, seeded: bool):
        self.files, self.labels = manifest.files, manifest.labels
        self.transform, self.seed, self.seeded = transform, seed, seeded

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        img = decode_image(read_file(self.files[index]), mode=ImageReadMode.RGB)  # JPEG/PNG, RGB or grey
        if self.seeded:
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
                torch.manual_seed(sample_seed(self.seed, epoch, index))
                return self.transform(img), self.labels[index]
        return self.transform(img), self.labels[index]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (epoch, index) for this rank, skipping the first `skip` batches undecoded."""

    def __init__(self, loader: TorchLoader):
        # Weak: the loader owns this sampler. A cycle would keep a dropped loader and its persistent
        # workers alive until a garbage collection, which may then run inside a worker forked by the
        # next loader, where the workers cannot be shut down ("can only test a child process").
        self.loader = weakref.proxy(loader)
        self.skip = 0

    def indices(self) -> np.ndarray:
        return self.loader.epoch_indices(self.loader.epoch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices, batch = self.indices(), self.loader.cfg.batch_size
        for b in range(self.skip, len(self)):
            yield [(self.loader.epoch, int(i)) for i in indices[b * batch : (b + 1) * batch]]

    def __len__(self) -> int:
        return len(self.loader)


class TorchLoader(BaseLoader):
    """DataLoader with workers, pinned memory and persistent workers; mask added per batch.

    On a GPU the workers hand over uint8 images, normalised on the device after the copy; on the
    CPU the workers normalise (the main process would otherwise do it serially).
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.on_device = self.device.type == "cuda"
        transform = build_transform(cfg.img_size, cfg.train, normalise=not self.on_device)
        self.sampler = EpochBatchSampler(self)
        self.side = SideStream(self.device)
        self.dataloader = DataLoader(
            ManifestDataset(self.manifest, transform, cfg.seed, cfg.train),
            batch_sampler=self.sampler,
            num_workers=cfg.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=cfg.workers > 0,
            worker_init_fn=obey_only_parent_stop_signals,
        )

    def __iter__(self) -> Iterator[dict]:
        """BaseLoader's batches, made on a side CUDA stream on a GPU (`SideStream`): the copy of the next
        batch and its mask kernels overlap the current step."""
        return self._on_side_stream(super().__iter__())

    def _on_side_stream(self, batches: Iterator[dict]) -> Iterator[dict]:
        while True:
            with self.side:
                batch = next(batches, None)
                if batch is not None and self.on_device and batch["mask"] is not None:
                    # CuPy's memory pool would reuse the mask's memory on the side stream while the step
                    # still reads it: a copy the caching allocator tracks (record_stream), ~B*G*G bytes.
                    batch["mask"] = batch["mask"].clone()
            if batch is None:
                return
            yield self.side.hand_over(batch)

    def _batches(self, skip: int):
        self.sampler.skip = skip
        for images, labels in self.dataloader:
            images = normalize(images, self.device) if self.on_device else images
            yield images, labels.to(self.device, non_blocking=True), None
