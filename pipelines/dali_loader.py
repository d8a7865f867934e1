"""The DALI backend: file reader, decoder ('mixed' on GPU, 'cpu' otherwise) and augmentation in one
pipeline; the mask enters through `fn.external_source`, fed by the shared mask stage.

The pipeline is built once per epoch over this rank's files of that epoch, in order (the shared
(seed, epoch) permutation and rank shard, `BaseLoader.epoch_indices`, as in the other backends).
The masks of a batch depend only on (seed, rank, epoch, batch index), which is DALI's iteration
number, so DALI's run-ahead needs no bookkeeping. Mid-epoch resume fast-forwards: the consumed
batches are decoded again and dropped, so sample order, DALI's seeded augmentation and the masks
continue exactly.
"""

from __future__ import annotations

import itertools

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAIN_RATIO,
    TRAIN_SCALE,
    BaseLoader,
    eval_crop_fraction,
    sample_seed,
)


@pipeline_def
def image_pipeline(files, labels, *, img_size, train, gpu, mask_source):
    """Read `files` in order, decode, crop/resize, flip, normalise to CHW float; append the external mask."""
    jpegs, label = fn.readers.file(
        files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name="reader"
    )
    decoder = "mixed" if gpu else "cpu"
    cubic = types.INTERP_CUBIC
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, device=decoder, output_type=types.RGB,
            random_area=list(TRAIN_SCALE), random_aspect_ratio=list(TRAIN_RATIO), num_attempts=10,
        )  # fmt: skip
        images = fn.resize(images, size=[img_size, img_size], interp_type=cubic, antialias=True)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        shape = fn.peek_image_shape(jpegs)  # (H, W, C)
        side = dmath.floor(dmath.min(shape[0], shape[1]) * eval_crop_fraction(img_size))
        images = fn.decoders.image_crop(
            jpegs, device=decoder, output_type=types.RGB, crop_w=side, crop_h=side
        )
        images = fn.resize(images, size=[img_size, img_size], interp_type=cubic, antialias=True)
        mirror = 0
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", crop=[img_size, img_size], mirror=mirror,
        mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD],
    )  # fmt: skip
    outputs = [images, label.gpu() if gpu else label]
    if mask_source is not None:
        outputs.append(fn.external_source(source=mask_source, batch=True, device="gpu" if gpu else "cpu"))
    return tuple(outputs)


class DALILoader(BaseLoader):
    """DALI pipeline + DALIGenericIterator; CPU-only with device_id=None when cfg.device is 'cpu'."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gpu = self.device.type == "cuda"

    def _batches(self, skip: int):
        cfg, epoch, masks = self.cfg, self.epoch, self.masks
        indices = self.epoch_indices(epoch)
        files = [self.manifest.files[i] for i in indices]
        labels = [self.manifest.labels[i] for i in indices]

        def mask_source(index: int):  # DALI passes its iteration number: the batch index in this epoch
            return masks.raw(epoch, index)

        pipe = image_pipeline(
            files, labels, img_size=cfg.img_size, train=cfg.train, gpu=self.gpu,
            mask_source=mask_source if masks else None,
            batch_size=cfg.batch_size, num_threads=max(cfg.workers, 1),
            device_id=(self.device.index or 0) if self.gpu else None,
            seed=sample_seed(cfg.seed, epoch, cfg.rank) % 2**31,
        )  # fmt: skip
        names = ["images", "labels"] + (["mask"] if masks else [])
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(pipe, names, reader_name="reader", last_batch_policy=policy)
        for (out,) in itertools.islice(iterator, skip, None):
            labels = out["labels"].view(-1).long()
            yield out["images"], labels, out["mask"].view(len(labels), -1) if masks else None
