"""End-to-end fine-tuning of the exported encoder as a timm VisionTransformer (MAE's recipe).

AdamW with layer-wise lr decay (timm's param_groups_layer_decay), drop-path, warm-up + cosine,
label smoothing; RandAugment, mixup and cutmix through timm.data when switched on.

    python -m eval.finetune --checkpoint runs/demo/checkpoint-last.pth --data data/fashion-mnist \
        --epochs 10 --aa rand-m9-mstd0.5-inc1 --mixup 0.8 --cutmix 1.0
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import cli


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.finetune`."""
    parser = cli.evaluation_parser("eval.finetune", __doc__)
    for flag, kind, default, text in (
        ("--epochs", int, 10, "fine-tuning epochs"), ("--warmup-epochs", int, 1, "linear warm-up epochs"),
        ("--batch-size", int, 128, "images per step"), ("--workers", int, 2, "loader worker processes"),
        ("--lr", float, 1e-3, "AdamW peak lr"), ("--weight-decay", float, 0.05, "AdamW weight decay"),
        ("--layer-decay", float, 0.65, "layer-wise lr decay"), ("--drop-path", float, 0.1, "drop-path rate"),
        ("--smoothing", float, 0.1, "label smoothing"),
        ("--mixup", float, 0.0, "mixup alpha (MAE: 0.8); 0 = off"),
        ("--cutmix", float, 0.0, "cutmix alpha (MAE: 1.0); 0 = off"),
        ("--reprob", float, 0.0, "random erasing probability (MAE: 0.25)"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument("--data", required=True,
                        help="root with train/<class>/ and val/<class>/ folders (required)")
    parser.add_argument("--global-pool", choices=("avg", "token"), default="avg",
                        help="classifier input (default: %(default)s)")
    parser.add_argument("--aa", default=None,
                        help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (default: none)")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch loads (seconds)
    cli.answer_early(build_parser())

import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.utils.data import DataLoader

from errors import run_cli
from eval import common
from eval.features import ClassFolder, split_data
from model import load_encoder


def image_folders(root: str | Path, img_size: int, auto_augment: str | None, reprob: float):
    """Train/val ClassFolders of `root` with timm's training (RRC, flip, RandAugment) and eval transforms."""
    root = Path(root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root / split} does not exist; --data needs train/ and val/ folders")
    train = ClassFolder(str(root / "train"), create_transform(
        img_size, is_training=True, auto_augment=auto_augment, re_prob=reprob, interpolation="bicubic"))
    val = ClassFolder(str(root / "val"),
                      create_transform(img_size, is_training=False, interpolation="bicubic"))
    if train.classes != val.classes:
        raise ValueError(f"train classes {train.classes} differ from val classes {val.classes}")
    return train, val


@torch.no_grad()
def top1(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy of a classifier over a loader."""
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with autocast(device):
            logits = model(images.to(device))
        correct += (logits.argmax(1).cpu() == labels).sum().item()
        total += len(labels)
    return correct / total


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def finetune(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, args: argparse.Namespace,
             num_classes: int, tracker=None) -> float:
    """Fine-tune `model` for args.epochs; logs and returns the last epoch's val top-1."""
    device = torch.device(args.device)
    model.to(device)
    optimizer = create_optimizer_v2(model, "adamw", lr=args.lr, weight_decay=args.weight_decay,
                                    layer_decay=args.layer_decay)
    steps_per_epoch = len(train_loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=1e-6,
                                  warmup_t=args.warmup_epochs * steps_per_epoch, warmup_lr_init=1e-6,
                                  t_in_epochs=False)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=num_classes)
        loss_fn = SoftTargetCrossEntropy()
    else:
        loss_fn = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else nn.CrossEntropyLoss()
    step, accuracy = 0, 0.0
    for epoch in range(args.epochs):
        model.train()
        for images, labels in train_loader:
            images, labels = images.to(device), labels.to(device)
            if mixup is not None:
                if len(images) % 2:  # timm's batch mixup pairs images with the flipped batch
                    images, labels = images[:-1], labels[:-1]
                images, labels = mixup(images, labels)
            with autocast(device):
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        accuracy = top1(model, val_loader, device)
        print(f"epoch {epoch}: loss {loss.item():.4f}, val top-1 {accuracy:.4f}")
        if tracker is not None:
            tracker.log_metrics({"finetune_top1": accuracy, "finetune_loss": loss.item()}, step=epoch)
    return accuracy


def main(argv: list[str] | None = None) -> dict:
    """Command line: fine-tune a checkpoint's encoder on a class-folder dataset, logged to MLflow."""
    args, checkpoint = common.start(build_parser(), argv)
    torch.manual_seed(args.seed)
    img_size = checkpoint["model_args"]["img_size"]
    train_set, val_set = image_folders(args.data, img_size, args.aa, args.reprob)
    model = load_encoder(checkpoint, num_classes=len(train_set.classes), drop_path_rate=args.drop_path,
                         global_pool=args.global_pool)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, num_workers=args.workers,
                              drop_last=True)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one batch of {args.batch_size}")
    params = {key: getattr(args, key) for key in (
        "epochs", "lr", "weight_decay", "layer_decay", "drop_path", "global_pool", "smoothing", "mixup",
        "cutmix", "aa", "reprob", "batch_size")}
    with common.open_tracker(args, checkpoint, "finetune", params=params,
                             data=split_data(args.data)) as tracker:
        accuracy = finetune(model, train_loader, val_loader, args, len(train_set.classes), tracker)
    print(f"fine-tune top-1: {accuracy:.4f}")
    return {"finetune_top1": accuracy}


if __name__ == "__main__":
    run_cli(main)  # an expected failure is one line; --debug shows the traceback
