"""What every evaluation command shares: its start (arguments, device, checkpoint), the probe heads'
training loop, and its MLflow run.

An evaluation run records what it evaluated, so that `eval.compare` pools only like with like: its
pretraining run (tag `pretrain_run_id`, and `mlflow.parentRunId`, which nests it under that run in
the MLflow UI), the probe and its parameters, and every dataset split it read (an MLflow dataset
input: path, split, number of images, digest). The tag `colormae.evaluation` hashes all of it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from configs import flatten
from configs.fingerprint import digest_of
from model import load_encoder
from model.pretrained import read_pretrained
from pipelines import scan
from tracking import Tracker, resolve_uri, standard_tags

EVALUATION_TAG = "colormae.evaluation"  # hash of probe, parameters, checkpoint epoch and data digests
SUMMARY_TAG = "colormae.evaluation_summary"  # the same in words, for eval.compare's report


@dataclass(frozen=True)
class EvalData:
    """One dataset split an evaluation read."""

    name: str  # e.g. "fashion-mnist/val"
    path: str
    split: str  # train | val | test
    num_images: int
    digest: str  # of the content (tensor_data) or of the file list, labels and sizes (folder_data)

    def describe(self) -> str:
        return f"{self.name} ({self.num_images} images, {self.digest})"


def folder_data(root: str | Path, split: str) -> EvalData:
    """A class folder's record; the digest hashes each usable image's relative path, label and byte size
    (reading every byte of an ImageNet-sized folder would cost minutes)."""
    manifest = scan(root)
    lines = (f"{os.path.relpath(file, manifest.root)}\t{label}\t{os.path.getsize(file)}"
             for file, label in zip(manifest.files, manifest.labels, strict=True))
    digest = hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]
    return EvalData(f"{Path(root).resolve().parent.name}/{split}", str(Path(root).resolve()), split,
                    len(manifest), digest)


def tensor_data(name: str, path: str, split: str, *tensors: torch.Tensor) -> EvalData:
    """An in-memory split's record; the digest hashes the bytes of its tensors (images, labels)."""
    digest = hashlib.sha1()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return EvalData(f"{name}/{split}", path, split, len(tensors[0]), digest.hexdigest()[:12])


def fit_head(
    head: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
) -> nn.Module:
    """Train a probe head on cached (N, ...) inputs: AdamW, cosine decay per step; returns it in eval mode.

    ``loss_fn(head, input_batch, target_batch)`` gives the loss. Batches of one sample are
    skipped (the heads start with a BatchNorm).
    """
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(inputs) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator).to(inputs.device)
        for start in range(0, len(inputs), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:
                continue
            loss = loss_fn(head, inputs[batch], targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return head.eval()


def start(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    """An evaluation's start: its arguments (with `--device auto` resolved) and the pretrained encoder
    `--checkpoint` names (a .pth, an export folder, models:/... or runs:/... of `--mlflow-uri`'s store;
    `model.pretrained.read_pretrained`), checked against `--model` when given."""
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    return args, read_pretrained(args.checkpoint, expect_preset=args.model, tracking_uri=args.mlflow_uri)


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu; other names pass through."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def build_model(checkpoint: dict, device: str | torch.device) -> nn.Module:
    """The checkpoint's encoder (timm's VisionTransformer: `forward_features` gives the cls and patch
    tokens after the final norm, as the MAE's does), frozen, in eval mode on `device`."""
    encoder = load_encoder(checkpoint).to(device).eval()
    encoder.requires_grad_(False)
    return encoder


def training_config(checkpoint: dict) -> dict:
    """The pretraining config stored in the checkpoint, flattened to dotted keys ("mask.schedule")."""
    return flatten(checkpoint.get("config") or {})


def pretrain_run_id(checkpoint: dict, override: str | None = None) -> str:
    """MLflow run id of the pretraining run that wrote the checkpoint; a clear error when missing."""
    run_id = override or checkpoint.get("mlflow_run_id")
    if not run_id:
        raise ValueError(
            f"checkpoint {checkpoint.get('path', '')} has no mlflow_run_id (pretrained with MLflow off?); "
            "pass --pretrain-run-id RUN_ID so the evaluation is linked to its pretraining run"
        )
    return str(run_id)


@contextlib.contextmanager
def open_tracker(args: argparse.Namespace, checkpoint: dict, evaluation: str, *, params: dict,
                 data: list[EvalData]) -> Iterator:
    """An MLflow run for one evaluation, nested under its pretraining run, recording what it evaluated.

    `params` are the probe's parameters, `data` the splits it reads. Closed FINISHED on success and
    FAILED when the evaluation raises.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID  # mlflow: optional, as in tracking/

    run_id = pretrain_run_id(checkpoint, args.pretrain_run_id)
    config = training_config(checkpoint)
    uri = resolve_uri(args.mlflow_uri or config.get("log.mlflow_uri"), config.get("log.runs_root", "runs"))
    experiment = args.experiment or config.get("log.experiment", "colormae")
    params = {"probe": evaluation, **params, "probe_seed": args.seed,
              "checkpoint_epoch": checkpoint.get("epoch", 0)}
    summary = (", ".join(f"{key}={value}" for key, value in params.items()) + "; data: "
               + ", ".join(split.describe() for split in data))
    identity = {**params, **{f"data.{split.split}": f"{split.name}:{split.digest}" for split in data}}
    tags = {**standard_tags(f"eval.{evaluation}"),  # the run page's Source and Created by
            "pretrain_run_id": run_id, MLFLOW_PARENT_RUN_ID: run_id, "evaluation": evaluation,
            "checkpoint": checkpoint["path"], "mask": config.get("mask.schedule", ""),
            "seed": config.get("train.seed", ""), EVALUATION_TAG: digest_of(identity), SUMMARY_TAG: summary}
    tracker = Tracker(uri, experiment, run_name=f"{evaluation}-{run_id[:8]}", tags=tags,
                      offline_dir=args.offline_dir)
    tracker.log_params({**params, **checkpoint["model_args"]})
    for split in data:
        context = "train" if split.split == "train" else "eval"
        tracker.log_dataset(split.name, split.path, split.digest, split.num_images, context)
    try:
        yield tracker
    except BaseException:
        tracker.close(status="FAILED")
        raise
    tracker.close()
