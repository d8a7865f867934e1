"""The FFCV backend: an ffcv Loader over a .beton (written by `prepare.ensure_beton` when missing);
the mask is appended after the batch reaches the device.

Sample order comes from the shared (seed, epoch) permutation and rank shard
(`BaseLoader.epoch_indices`), handed to ffcv as a TraversalOrder, so all three backends give each
rank the same files and no process group is needed. A mid-epoch resume hands ffcv only the epoch's
remaining samples, so nothing is decoded twice; order and masks continue exactly, but ffcv draws its
crops and flips from numba's unseeded RNG, so the augmentation of the remaining batches is redrawn.
An epoch that stops early closes ffcv's epoch iterator (its thread and batch buffers) at once.
"""

from __future__ import annotations

import json
from contextlib import suppress
from pathlib import Path
from queue import Empty

import numpy as np
import torch
from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
from ffcv.loader import Loader
from ffcv.reader import Reader
from ffcv.transforms import NormalizeImage, RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAIN_RATIO,
    TRAIN_SCALE,
    BaseLoader,
    eval_crop_fraction,
    normalize,
)
from .prepare import ensure_beton


class SharedOrder(TraversalOrder):
    """This rank's share of the shared (seed, epoch) order from sample `start` of it on; ffcv's Loader
    calls the instance."""

    def __init__(self, loader: FFCVLoader):
        self.loader, self.start = loader, 0

    def __call__(self, _loader: Loader) -> SharedOrder:
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        indices = self.loader.epoch_indices(epoch)[self.start :]
        return indices.astype(np.uint64)  # ffcv's pipeline is typed for uint64


class FFCVLoader(BaseLoader):
    """ffcv Loader over `cfg.ffcv_path`, or over the .beton of `cfg.data` in its cache folder (see
    `prepare.ensure_beton`); classes and skip count come from the beton's .json when `data` is empty."""

    requires_data = False  # a bare `ffcv_path` is enough

    def __init__(self, cfg):
        super().__init__(cfg)
        path = ensure_beton(self.manifest, cfg.ffcv_path, cfg.workers)
        meta = json.loads(Path(f"{path}.json").read_text()) if Path(f"{path}.json").exists() else {}
        self.classes = self.classes or meta.get("classes", [])
        self.num_skipped = self.num_skipped if self.manifest else meta.get("num_skipped", 0)
        self.data_signature = self.data_signature or meta.get("signature", "")  # a bare .beton's own
        self.num_images = Reader(str(path)).num_samples

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
        self.order = SharedOrder(self)
        self.loader = Loader(
            str(path),
            batch_size=cfg.batch_size,
            num_workers=max(cfg.workers, 1),
            order=self.order,
            drop_last=self.drop_last,
            pipelines={"image": image_ops, "label": label_ops},
        )

    def _batches(self, skip: int):
        self.order.start, self.loader.next_epoch = skip * self.cfg.batch_size, self.epoch
        iterator = iter(self.loader)  # ffcv's epoch iterator: a thread decoding the batches ahead
        try:
            for images, labels in iterator:
                labels = labels.to(self.device, dtype=torch.int64).view(-1)
                # ffcv refills its batch buffers a few batches later: hand out a tensor of our own
                images = normalize(images, self.device) if self.device.type == "cuda" else images.clone()
                yield images, labels, None
        finally:  # also when the epoch stops early: the thread ends and its buffers are freed
            iterator.close()
            while iterator.is_alive():  # its end-of-epoch put waits for room in a full queue: make some
                with suppress(Empty):
                    iterator.output_queue.get(timeout=0.1)
            iterator.join()
