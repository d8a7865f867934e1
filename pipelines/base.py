"""What every backend shares: the folder scan, sample order and sharding, the mask stage,
normalisation, exact (and elastic) resume."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from .manifest import Manifest, scan

if TYPE_CHECKING:
    from .config import LoaderConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_SCALE = (0.2, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875  # resize the short side to S / 0.875, then centre-crop S (224 <- 256)


def eval_crop_fraction(img_size: int) -> float:
    """Evaluation crop: the centre square of this fraction of the short side, resized to S.

    The same view as resizing the short side to int(S / 0.875) and centre-cropping S (224/256), in
    the crop-then-resize form that all three backends can express (ffcv's CenterCrop decoder).
    """
    return img_size / int(img_size / EVAL_CROP_FRACTION)


def eval_crop_side(height: int, width: int, img_size: int) -> int:
    return int(min(height, width) * eval_crop_fraction(img_size))


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Sample order of one epoch: a permutation seeded from (seed, epoch), or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def shard(order: np.ndarray, rank: int, world_size: int, batch_size: int, *, drop_last: bool) -> np.ndarray:
    """This rank's samples of `order`, in reading order: the ranks' batches k together are the k-th
    global batch `order[k*B*W : (k+1)*B*W]`, rank r reading its r-th block of B.

    So after k batches on every rank, the ranks have read exactly the first k*B*W samples: an epoch's
    position is one number (samples consumed), and a resume on another number of ranks continues
    there (see `BaseLoader.state_dict`). With `drop_last` only whole global batches are read (every
    rank makes the same number of full batches); without it, every sample goes to exactly one rank.
    """
    block = batch_size * world_size
    if drop_last:
        order = order[: len(order) // block * block]
    starts = range(rank * batch_size, len(order), block)
    return np.concatenate([order[start : start + batch_size] for start in starts] or [order[:0]])


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else -(-num_samples // batch_size)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed from (seed, epoch, index): independent of worker count and resume point."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


@functools.cache
def imagenet_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std x 255 as (1, 3, 1, 1) tensors on `device`, made once per device (each
    `torch.tensor(..., device=cuda)` is a blocking host-to-device copy)."""
    mean, std = (torch.tensor(s, device=device).view(1, 3, 1, 1) * 255 for s in (IMAGENET_MEAN, IMAGENET_STD))
    return mean, std


def normalize(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float32 on `device`, normalised with the ImageNet mean/std."""
    mean, std = imagenet_stats(torch.device(device))
    return images.to(device, non_blocking=True).float().sub_(mean).div_(std)


class SideStream:
    """Where a loader makes its batches on a GPU: a side CUDA stream, torch's and CuPy's current stream
    inside `with`, so the next batch's host-to-device copy, normalisation and mask kernels overlap the
    step computing on the default stream; `hand_over` makes the consumer's stream wait for them. On the
    CPU both are no-ops: the same batches in the same order."""

    def __init__(self, device: torch.device):
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._contexts = contextlib.ExitStack()

    def __enter__(self) -> SideStream:
        if self.stream is not None:
            self._contexts.enter_context(torch.cuda.stream(self.stream))
            if importlib.util.find_spec("cupy"):  # the mask stage's kernels (and DLPack's hand-over)
                import cupy

                self._contexts.enter_context(cupy.cuda.ExternalStream(self.stream.cuda_stream))
        return self

    def __exit__(self, *exc) -> None:
        self._contexts.close()

    def hand_over(self, batch: dict) -> dict:
        """`batch` for the current stream: it waits for the side stream's work, and the caching allocator
        keeps each tensor's memory until the current stream is done with it (`record_stream`)."""
        if self.stream is None:
            return batch
        current = torch.cuda.current_stream(self.stream.device)
        current.wait_stream(self.stream)
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                value.record_stream(current)
        return batch


class MaskStage:
    """The ColorMAE mask stage, shared by all backends: the masks of batch `index` of `epoch`.

    A pure function of (seed, rank, epoch, index) (see `noise.MaskGenerator`), so it has no state to
    select, save or rewind. A short last batch gets the first rows of a full batch's masks.
    """

    def __init__(self, cfg: LoaderConfig):
        from noise import MaskGenerator

        self.device = torch.device(cfg.device)
        self.batch_size = cfg.batch_size
        self.generator = MaskGenerator(
            schedule=cfg.schedule,
            grid=cfg.img_size // cfg.patch_size,
            mask_ratio=cfg.mask_ratio,
            seed=cfg.seed,
            rank=cfg.rank,
            device=cfg.device,
            bank_path=cfg.mask_bank,
        )
        self.seconds = 0.0  # host time spent drawing masks (on a GPU, CuPy kernels run asynchronously)

    def raw(self, epoch: int, index: int, rows: int | None = None):
        """Bool (rows, G*G) masks as the generator's array type (numpy on CPU, CuPy on CUDA)."""
        start = time.perf_counter()
        mask = self.generator(self.batch_size, epoch=epoch, index=index)[:rows]
        self.seconds += time.perf_counter() - start
        return mask

    def __call__(self, epoch: int, index: int, rows: int) -> torch.Tensor:
        """Bool (rows, G*G) masks as a torch tensor on the loader's device."""
        from noise import mask_to_torch

        return mask_to_torch(self.raw(epoch, index, rows), self.device)  # DLPack: no copy


class BaseLoader:
    """What every backend shares: the folder scan, the epoch's sample order and length, the mask and
    exact resume. A backend implements `_batches(skip)` and sets `num_images` if it reads another source.

    `state_dict()` records the epoch and the samples of its order consumed by all ranks together;
    after `load_state_dict()` the next iteration starts at the first unconsumed batch, also on another
    number of ranks or another per-rank batch size (the position must fall on a global batch of this
    loader). Calling `set_epoch()` with the restored epoch keeps that pending resume point. Masks
    need no state: batch `index` of `epoch` gets `self.masks(epoch, index, rows)`.
    """

    requires_data = True  # False: the backend can read another source when `cfg.data` is empty

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.drop_last = cfg.train if cfg.drop_last is None else cfg.drop_last
        needs_scan = cfg.data or self.requires_data
        manifest = scan(cfg.data, cfg.workers or None, cfg.max_pixels) if needs_scan else None
        self.manifest: Manifest | None = manifest
        self.classes: list[str] = manifest.classes if manifest else []
        self.num_skipped: int = manifest.num_skipped if manifest else 0
        self.data_signature: str = manifest.signature() if manifest else ""  # part of a run's fingerprint
        self.num_images: int = len(manifest) if manifest else 0  # samples per epoch, all ranks together
        self.masks = MaskStage(cfg) if cfg.schedule else None
        self.global_batch = cfg.batch_size * cfg.world_size  # samples the ranks' batches k read together
        self.epoch = 0
        self._consumed = 0  # batches of this epoch read by this rank (the first global batches)
        self._resume_at = 0
        self._reading: weakref.ref | None = None  # the pass of __iter__ last started

    def _batches(self, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Yield (images, labels, mask) of this epoch, starting after `skip` batches, which are not
        decoded. `mask` is None (`__iter__` attaches the mask stage's) unless the backend's own
        pipeline draws it (DALI)."""
        raise NotImplementedError

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices of `epoch`, in reading order: its share of the (seed, epoch) order."""
        cfg = self.cfg
        order = epoch_order(self.num_images, seed=cfg.seed, epoch=epoch, shuffle=cfg.train)
        return shard(order, cfg.rank, cfg.world_size, cfg.batch_size, drop_last=self.drop_last)

    def __len__(self) -> int:
        cfg = self.cfg
        count = len(shard(np.arange(self.num_images), cfg.rank, cfg.world_size, cfg.batch_size,
                          drop_last=self.drop_last))
        return num_batches(count, cfg.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[dict]:
        """This epoch's batches from the resume point on; a pass still open (an epoch stopped early) is
        closed first, so its backend iterator ends before the next one starts."""
        previous = self._reading() if self._reading else None
        if previous is not None:
            previous.close()
        batches = self._read()
        self._reading = weakref.ref(batches)  # weak: a pass left open must not keep the loader alive
        return batches

    def _read(self) -> Iterator[dict]:
        skip, self._resume_at = self._resume_at, 0
        self._consumed = skip
        for images, labels, mask in self._batches(skip):
            if mask is None and self.masks:
                mask = self.masks(self.epoch, self._consumed, len(labels))
            self._consumed += 1
            yield {"images": images, "mask": mask, "labels": labels}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: its shuffle order, augmentation seeds and masks."""
        if epoch == self.epoch and self._resume_at:
            return
        self.epoch, self._consumed, self._resume_at = epoch, 0, 0

    def state_dict(self) -> dict:
        """{"epoch", "samples"}: the samples of the epoch's order read by all ranks together."""
        return {"epoch": self.epoch, "samples": min(self._consumed * self.global_batch, self.num_images)}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`'s resume point. Older checkpoints' {"epoch", "batches"} count this
        loader's batches (their "mask" entry is not needed)."""
        samples = state["samples"] if "samples" in state else state["batches"] * self.global_batch
        if samples % self.global_batch and samples < self.num_images:
            raise ValueError(f"resume position {samples} of epoch {state['epoch']} is not a multiple of "
                             f"the {self.global_batch} samples the ranks read per batch")
        batches = -(-samples // self.global_batch)
        self.epoch, self._consumed, self._resume_at = state["epoch"], batches, batches
