"""The DALI backend: file reader, decoder ('mixed' on GPU, 'cpu' otherwise) and augmentation in one
pipeline; the mask enters through `fn.external_source`, fed by the shared mask stage.

The pipeline is built once per epoch over that epoch's file order (the same (seed, epoch)
permutation as the torch backend), and DALI's reader shards it with shard_id / num_shards.
Mid-epoch resume fast-forwards: the consumed batches are decoded again and dropped (their masks are
not drawn), so sample order, DALI's seeded augmentation and the masks continue exactly.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAIN_RATIO,
    TRAIN_SCALE,
    BaseLoader,
    epoch_order,
    eval_crop_fraction,
    num_batches,
    sample_seed,
    shard,
)
from .manifest import Manifest


@pipeline_def
def image_pipeline(files, labels, *, shard_id, num_shards, img_size, train, gpu, mask_source):
    """Read, decode, crop/resize, flip, normalise to CHW float; append the external mask."""
    jpegs, label = fn.readers.file(
        files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
        random_shuffle=False, pad_last_batch=True, name="reader",
    )  # fmt: skip
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


class MaskSource:
    """`fn.external_source` callback: one MaskGenerator call per pipeline iteration.

    DALI runs ahead of the consumer, so the generator state before each iteration is kept: the
    loader reports the state matching the consumed batches and rewinds run-ahead draws at epoch end.
    """

    def __init__(self, loader: DALILoader, skip: int):
        self.loader, self.skip = loader, skip
        self.states: dict[int, dict] = {}

    def __call__(self, iteration: int):
        generator, batch = self.loader.masks.generator, self.loader.cfg.batch_size
        if iteration < self.skip:  # fast-forwarded batches are dropped: draw nothing
            return generator.xp.zeros((batch, generator.num_patches), dtype=bool)
        self.states[iteration] = generator.state_dict()
        return self.loader.masks.raw(batch)

    def state_at(self, batches: int) -> dict:
        return self.states.get(batches) or self.loader.masks.generator.state_dict()


class DALILoader(BaseLoader):
    """DALI pipeline + DALIGenericIterator; CPU-only with device_id=None when cfg.device is 'cpu'."""

    def __init__(self, cfg, manifest: Manifest):
        super().__init__(cfg, manifest)
        self.files, self.labels = manifest.files, manifest.labels
        self.gpu = self.device.type == "cuda"
        self.mask_source: MaskSource | None = None

    def _epoch_files(self) -> tuple[list[str], list[int]]:
        """This epoch's global file order (DALI's reader then takes this rank's shard)."""
        order = epoch_order(len(self.files), seed=self.cfg.seed, epoch=self.epoch, shuffle=self.cfg.train)
        if self.drop_last:  # equal shards: the same number of steps on every rank
            order = order[: len(order) // self.cfg.world_size * self.cfg.world_size]
        return [self.files[i] for i in order], [self.labels[i] for i in order]

    def __len__(self) -> int:
        cfg = self.cfg
        count = len(shard(np.arange(len(self.files)), cfg.rank, cfg.world_size, equal=self.drop_last))
        return num_batches(count, cfg.batch_size, self.drop_last)

    def _batches(self, skip: int):
        cfg = self.cfg
        files, labels = self._epoch_files()
        self.mask_source = MaskSource(self, skip) if self.masks else None
        pipe = image_pipeline(
            files, labels, shard_id=cfg.rank, num_shards=cfg.world_size, img_size=cfg.img_size,
            train=cfg.train, gpu=self.gpu, mask_source=self.mask_source,
            batch_size=cfg.batch_size, num_threads=max(cfg.workers, 1),
            device_id=(self.device.index or 0) if self.gpu else None,
            seed=sample_seed(cfg.seed, self.epoch, cfg.rank) % 2**31,
        )  # fmt: skip
        names = ["images", "labels"] + (["mask"] if self.masks else [])
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        iterator = DALIGenericIterator(pipe, names, reader_name="reader", last_batch_policy=policy)
        try:
            for step, (out,) in enumerate(iterator):
                if step < skip:
                    continue
                labels = out["labels"].view(-1).long()
                yield out["images"], labels, out["mask"].view(len(labels), -1) if self.masks else None
        finally:  # epoch end or an early break: rewind the mask draws DALI made ahead of the consumer
            if self.mask_source is not None:
                self.masks.generator.load_state_dict(self.mask_source.state_at(self._consumed))
            self.mask_source = None

    def _mask_state(self) -> dict | None:
        if self.mask_source is not None:
            return self.mask_source.state_at(self._consumed)
        return super()._mask_state()
