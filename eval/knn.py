"""Weighted k-NN classification on frozen features (cosine similarity, DINO-style votes).

    python -m eval.knn --checkpoint runs/demo/checkpoint-last.pth --data data/fashion-mnist
"""

from __future__ import annotations

import argparse

import cli


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.knn`."""
    parser = cli.evaluation_parser("eval.knn", __doc__)
    cli.add_data_args(parser)
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.07,
                        help="vote weight exp(similarity / T) (default: %(default)s)")
    cli.add_pool_arg(parser)
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch loads (seconds)
    cli.answer_early(build_parser())

import torch
import torch.nn.functional as F

from errors import run_cli
from eval import common, features


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predict a class for each test feature from its k nearest training features.

    Similarity is the cosine of the angle between features; each neighbour votes for its class
    with weight exp(similarity / temperature), as in DINO's k-NN evaluation.
    """
    if len(train_features) != len(train_labels):
        raise ValueError(f"{len(train_features)} training features but {len(train_labels)} labels")
    if len(train_features) == 0:
        raise ValueError("k-NN needs at least one training feature")
    k = min(k, len(train_features))
    train = F.normalize(train_features.float(), dim=1)
    predictions = []
    for start in range(0, len(test_features), chunk_size):
        test = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(test), num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of `knn_predict` on a labelled test set."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    predicted = knn_predict(train_features, train_labels, test_features, num_classes,
                            k=k, temperature=temperature)
    return (predicted == test_labels).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    """Command line: features of a checkpoint's encoder -> k-NN top-1, logged to MLflow."""
    args, checkpoint = common.start(build_parser(), argv)
    params = {"k": args.k, "temperature": args.temperature, "pool": args.pool, "loader": args.loader}
    with common.open_tracker(args, checkpoint, "knn", params=params, data=features.split_data(args.data)) \
            as tracker:
        train, test = features.checkpoint_features(checkpoint, args, pool=args.pool)
        accuracy = knn_accuracy(*train, *test, k=args.k, temperature=args.temperature)
        metrics = {"knn_top1": accuracy}
        tracker.log_metrics(metrics, step=checkpoint.get("step", 0))  # the pretraining step
    print(f"k-NN (k={args.k}, T={args.temperature}) top-1: {accuracy:.4f}")
    return metrics


if __name__ == "__main__":
    run_cli(main)  # an expected failure is one line; --debug shows the traceback
