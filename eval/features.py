"""Frozen-encoder features: cls / average-pooled / patch tokens of `MaskedAutoencoderViT.forward_features`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from cli import POOLS
from eval import common
from pipelines import DataConfig, LoaderConfig, build_loader


class ClassFolder(ImageFolder):
    """torchvision's ImageFolder without hidden folders (such as the loaders' `.colormae` cache)."""

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"{directory} has no class folders")
        return classes, {name: index for index, name in enumerate(classes)}


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1 + L, D) tokens -> (B, D) cls token or mean patch token; "patches" -> (B, L, D)."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "avg":
        return tokens[:, 1:].mean(dim=1)
    if pool == "patches":
        return tokens[:, 1:]
    raise ValueError(f"unknown pool {pool!r}; allowed: {', '.join((*POOLS, 'patches'))}")


@torch.no_grad()
def loader_features(
    mae: nn.Module, batches: Iterable[dict], device: str | torch.device, pool: str = "cls"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen encoder (all patches visible) over {"images", "labels"} batches.

    Returns float32 features on `device` and int64 labels; bf16 autocast on CUDA.
    """
    mae.eval()
    device = torch.device(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    features, labels = [], []
    for batch in tqdm(batches, desc="features", unit="batch", leave=False, disable=not sys.stderr.isatty()):
        with autocast:
            tokens = mae.forward_features(batch["images"].to(device, non_blocking=True))
        features.append(pool_tokens(tokens, pool).float())
        labels.append(batch["labels"].to(device))
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features), torch.cat(labels)


def tensor_batches(images: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 256):
    """Yield {"images", "labels"} dicts over in-memory tensors (labels default to zeros)."""
    if labels is None:
        labels = torch.zeros(len(images), dtype=torch.long)
    for start in range(0, len(images), batch_size):
        yield {"images": images[start : start + batch_size], "labels": labels[start : start + batch_size]}


def extract_tokens(mae: nn.Module, images: torch.Tensor, batch_size: int, device: str | torch.device,
                   pool: str = "patches") -> torch.Tensor:
    """Features of in-memory normalised images (N, 3, S, S); patch tokens (N, L, D) by default."""
    return loader_features(mae, tensor_batches(images, batch_size=batch_size), device, pool)[0]


def split_data(root: str | Path) -> list[common.EvalData]:
    """`common.EvalData` records of the train/ and val/ class folders under `root`."""
    return [common.folder_data(check_split(root, split), split) for split in ("train", "val")]


def check_split(root: str | Path, split: str) -> Path:
    """`root`/`split`, or a clear error when that folder is missing."""
    folder = Path(root) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; --data needs train/ and val/ class folders")
    return folder


def checkpoint_features(checkpoint: dict, args: argparse.Namespace, pool: str):
    """((train features, labels), (val features, labels)) of the checkpoint's encoder on `args.data`."""
    mae = common.build_model(checkpoint, args.device)
    img_size, patch_size = checkpoint["model_args"]["img_size"], checkpoint["model_args"]["patch_size"]
    splits = []
    for split in ("train", "val"):
        folder = check_split(args.data, split)
        data = DataConfig(loader=args.loader, path=str(folder), img_size=img_size, workers=args.workers)
        config = LoaderConfig.from_sections(data, patch_size=patch_size, batch_size=args.batch_size,
                                            train=False, seed=args.seed, device=args.device)
        splits.append(loader_features(mae, build_loader(config), args.device, pool))
    return tuple(splits)
