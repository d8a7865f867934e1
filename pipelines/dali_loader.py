"""The DALI backend: decoder ('mixed' on GPU, 'cpu' otherwise), crop, resize, flip and normalisation in
one pipeline, built once per loader; what to read enters through `fn.external_source`.

Each epoch the loader hands the pipeline's sources the batches still to read of that epoch (the shared
(seed, epoch) order and rank share, `BaseLoader.epoch_indices`, as in the other backends): the encoded
files, their labels, the crop windows and flips, and the masks of (seed, rank, epoch, batch index).
The crop windows are torchvision's RandomResizedCrop and flip, drawn on the host from the per-sample
seed (seed, epoch, index) exactly as the torch backend draws them, so an image gets the same view on
both backends, and a mid-epoch resume starts reading at its position with nothing decoded twice. An
epoch that stops early ends the sources at their next call: at most DALI's prefetch depth of batches
are decoded and dropped.
"""

from __future__ import annotations

import contextlib
import io
import math
import weakref

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor
from PIL import Image

from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRAIN_RATIO,
    TRAIN_SCALE,
    BaseLoader,
    eval_crop_side,
    sample_seed,
)


def crop_window(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's RandomResizedCrop.get_params (scale 0.2-1, ratio 3/4-4/3),
    drawn from `generator` in the same order, so a generator seeded as the torch backend's is gives
    the same window."""
    area, log_ratio = height * width, torch.log(torch.tensor(TRAIN_RATIO))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*TRAIN_SCALE, generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    ratio = width / height  # fallback: the centre crop at the nearest allowed aspect ratio
    if ratio < min(TRAIN_RATIO):
        w, h = width, round(width / min(TRAIN_RATIO))
    elif ratio > max(TRAIN_RATIO):
        h, w = height, round(height * max(TRAIN_RATIO))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pipeline_def
def image_pipeline(source, mask_source, *, img_size, gpu):
    """Decode each file's window (anchor, shape in pixels, H-W order), resize to S x S, flip, normalise
    to CHW float; append the external mask."""
    files, labels, anchors, shapes, flips = fn.external_source(
        source=source, num_outputs=5, batch=True, batch_info=True)
    images = fn.decoders.image_slice(
        files, anchors, shapes, device="mixed" if gpu else "cpu", output_type=types.RGB,
        axis_names="HW", normalized_anchor=False, normalized_shape=False)
    images = fn.resize(images, size=[img_size, img_size], interp_type=types.INTERP_CUBIC, antialias=True)
    images = fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW", mirror=flips,
        mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
    outputs = [images, labels.gpu() if gpu else labels]
    if mask_source is not None:
        outputs.append(fn.external_source(source=mask_source, batch=True, batch_info=True,
                                          device="gpu" if gpu else "cpu"))
    return tuple(outputs)


class DALILoader(BaseLoader):
    """One DALI pipeline per loader, fed an epoch's remaining batches by `_batches`; CPU-only with
    device_id=None when cfg.device is 'cpu'. `builds` counts pipeline builds (one per loader)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.gpu = self.device.type == "cuda"
        self.builds = 0
        self._pipe = None
        self._plan: list[np.ndarray] = []  # the sample indices of each batch the sources still hand out
        self._epoch, self._first = 0, 0  # the epoch of the plan, and the batch index of self._plan[0]

    def _pipeline(self):
        if self._pipe is None:
            cfg = self.cfg
            loader = weakref.proxy(self)  # weak: the pipeline must not keep its loader alive (no cycle)
            self._pipe = image_pipeline(
                lambda info: loader._source(info),
                (lambda info: loader._mask_source(info)) if self.masks else None, img_size=cfg.img_size,
                gpu=self.gpu, batch_size=cfg.batch_size, num_threads=max(cfg.workers, 1),
                device_id=(self.device.index or 0) if self.gpu else None)
            self._pipe.build()
            self.builds += 1
        return self._pipe

    def _planned(self, info) -> np.ndarray:
        """The sample indices of the pipeline's iteration `info.iteration` of this pass."""
        if info.iteration >= len(self._plan):
            raise StopIteration
        return self._plan[info.iteration]

    def _source(self, info) -> tuple:
        """Encoded files, labels, crop anchors and shapes (pixels, H-W) and flips of one batch."""
        indices, cfg = self._planned(info), self.cfg
        files = [np.fromfile(self.manifest.files[i], dtype=np.uint8) for i in indices]
        windows, flips = [], []
        for index, data in zip(indices, files, strict=True):
            width, height = Image.open(io.BytesIO(data.tobytes())).size  # the header only
            if cfg.train:
                generator = torch.Generator().manual_seed(sample_seed(cfg.seed, self._epoch, int(index)))
                windows.append(crop_window(height, width, generator))
                flips.append(int(torch.rand(1, generator=generator).item() < 0.5))
            else:  # the torch backend's CenterSquare
                side = eval_crop_side(height, width, cfg.img_size)
                windows.append(((height - side) // 2, (width - side) // 2, side, side))
                flips.append(0)
        windows = np.array(windows, dtype=np.float32).reshape(-1, 4)
        labels = np.array([self.manifest.labels[i] for i in indices], dtype=np.int32)
        return files, labels, windows[:, :2].copy(), windows[:, 2:].copy(), np.array(flips, dtype=np.int32)

    def _mask_source(self, info):
        rows = len(self._planned(info))
        return self.masks.raw(self._epoch, self._first + info.iteration, rows)

    def _batches(self, skip: int):
        indices, size = self.epoch_indices(self.epoch), self.cfg.batch_size
        self._plan = [indices[b * size : (b + 1) * size] for b in range(skip, len(self))]
        self._epoch, self._first = self.epoch, skip
        pipe, ended = self._pipeline(), False
        try:
            while True:
                try:
                    outputs = pipe.run()
                except StopIteration:
                    ended = True
                    break
                images, labels, *mask = (to_torch_tensor(out.as_tensor(), copy=True) for out in outputs)
                yield images, labels.long().view(-1), mask[0].view(len(labels), -1) if mask else None
        finally:
            self._plan = []  # an epoch stopped early: the sources end the pass at their next call
            with contextlib.suppress(ReferenceError):  # collected with its loader: nothing to hand over
                while not ended:  # take the batches already in flight, so the next pass starts clean
                    try:
                        pipe.run()
                    except StopIteration:
                        ended = True
                pipe.reset()
