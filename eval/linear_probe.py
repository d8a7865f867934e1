"""Linear probe on cached frozen features, as in MAE: BatchNorm without affine + a linear head.

MAE trains the probe with LARS at batch 16384; on cached features AdamW with a cosine schedule
(no weight decay) reaches the same kind of optimum in a few seconds on a CPU, so that is what
this module uses.

    python -m eval.linear_probe --checkpoint runs/demo/checkpoint-last.pth --data data/fashion-mnist
"""

from __future__ import annotations

import argparse

import cli


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.linear_probe`."""
    parser = cli.evaluation_parser("eval.linear_probe", __doc__)
    cli.add_data_args(parser)
    cli.add_pool_arg(parser)
    cli.add_head_args(parser, "probe", epochs=30)
    parser.add_argument("--probe-batch-size", type=int, default=256,
                        help="probe training batch (default: %(default)s)")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch loads (seconds)
    cli.answer_early(build_parser())

import torch
import torch.nn.functional as F
from torch import nn

from errors import run_cli
from eval import common
from eval.features import checkpoint_features, split_data


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    """MAE's probe head: BatchNorm1d(affine=False) then Linear (weights ~ N(0, 0.01))."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
) -> nn.Sequential:
    """Fit `linear_head` on (N, D) features with AdamW + cosine decay; returns the head in eval mode."""
    torch.manual_seed(seed)
    head = linear_head(features.shape[1], num_classes).to(features.device)
    return common.fit_head(head, features, labels, lambda h, x, y: F.cross_entropy(h(x.float()), y),
                    epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.0, seed=seed)


@torch.no_grad()
def probe_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a trained head."""
    predicted = torch.cat([head(chunk.float()).argmax(1) for chunk in features.split(4096)])
    return (predicted == labels).float().mean().item()


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    **train_kwargs,
) -> float:
    """Train a probe on the training features and return its top-1 accuracy on the test features."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    head = train_linear_probe(train_features, train_labels, num_classes, **train_kwargs)
    return probe_accuracy(head, test_features, test_labels)


def main(argv: list[str] | None = None) -> dict:
    """Command line: cached features of a checkpoint's encoder -> linear probe top-1, logged to MLflow."""
    args, checkpoint = common.start(build_parser(), argv)
    params = {"pool": args.pool, "probe_epochs": args.epochs, "probe_lr": args.lr, "probe_optimizer": "adamw",
              "probe_batch_size": args.probe_batch_size, "loader": args.loader}
    with common.open_tracker(args, checkpoint, "linear", params=params, data=split_data(args.data)) \
            as tracker:
        train, test = checkpoint_features(checkpoint, args, pool=args.pool)
        accuracy = linear_probe_accuracy(
            *train, *test, epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr, seed=args.seed
        )
        metrics = {"linear_top1": accuracy}
        tracker.log_metrics(metrics, step=checkpoint.get("step", 0))  # the pretraining step
    print(f"linear probe ({args.pool}) top-1: {accuracy:.4f}")
    return metrics


if __name__ == "__main__":
    run_cli(main)  # an expected failure is one line; --debug shows the traceback
