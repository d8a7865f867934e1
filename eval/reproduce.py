"""Small-scale reproduction of ColorMAE's comparison: Fashion-MNIST pretraining per mask type + probes.

    python -m eval.reproduce --quick --json runs/reproduce-quick.json        # CPU wiring check
    python -m eval.reproduce --budget cpu --json runs/reproduce-cpu.json     # calibrated CPU table
    python -m eval.reproduce --budget gpu --json runs/reproduce-gpu.json     # every mask x 3 seeds
    python -m eval.reproduce --budget full --json runs/reproduce.json        # one GPU, longer

For every mask type (`noise.MASK_TYPES`: random and the five colours) and seed, the same MAE
(`--preset`, default "demo": width 192, depth 6, 32 px, patch 4; `--model-args` resizes it)
is pretrained with the same budget through train.py's own optimiser step (`train_step`, with its
`build_optimizer` and autocast precision), then probed: frozen k-NN (k=20, cosine, T=0.07), a frozen
linear probe (BatchNorm + linear, AdamW) on Fashion-MNIST classification, a linear segmentation probe
(mIoU) on 2x2 Fashion-MNIST canvases, and low-label fine-tuning (`eval.finetune`'s recipe on the first
--finetune-images labelled images). Each seed's untrained encoder (the weights every mask type of that
seed starts from) and the raw pixels go through the same probes. Nothing is tuned per mask type.

Each seed is a controlled experiment: every mask type starts from the same initial weights and sees
the same images in the same order with the same augmentation; only the mask differs. So the report
tests differences per seed (paired t-test, `eval.compare`), the untrained encoder included: pretraining
that does not beat it beyond seed noise has taught the probes nothing. The whole dataset lives on the
compute device; each batch is augmented there (RandomResizedCrop 0.2-1 + horizontal flip as one
grid_sample) and masked by `noise.MaskGenerator` (CuPy on GPU). Before the first run, a few timed
steps give the time estimate. Writes docs/results.md (table, command, hardware), its per-seed charts
beside it (results-charts/) and, with --json, the per-run figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parent.parent
BUDGET_FLAGS = ("train_images", "test_images", "epochs", "batch_size", "seg_train", "seg_test",
                "probe_epochs", "finetune_images", "finetune_epochs")
SMALL = {"img_size": 28, "model_args": "embed_dim=48,depth=3,decoder_embed_dim=48,decoder_depth=1"}
BUDGETS = {  # cpu: found by the search in docs/results.md; gpu: see GPU_MINUTES
    "quick": {"train_images": 1024, "test_images": 500, "epochs": 1, "batch_size": 64, "seg_train": 200,
              "seg_test": 100, "probe_epochs": 10, "finetune_images": 256, "finetune_epochs": 2,
              "seeds": "0,1", **SMALL},
    "cpu": {"train_images": 8192, "test_images": 1000, "epochs": 10, "batch_size": 128, "seg_train": 200,
            "seg_test": 100, "probe_epochs": 10, "finetune_images": 600, "finetune_epochs": 15,
            "seeds": "0,1,2", **SMALL},
    "gpu": {"train_images": 60000, "test_images": 10000, "epochs": 16, "batch_size": 1024,
            "seg_train": 2000, "seg_test": 500, "probe_epochs": 20, "finetune_images": 600,
            "finetune_epochs": 30, "seeds": "0,1,2"},
    "full": {"train_images": 60000, "test_images": 10000, "epochs": 30, "batch_size": 1024,
             "seg_train": 2000, "seg_test": 500, "probe_epochs": 30, "finetune_images": 600,
             "finetune_epochs": 50, "seeds": "0,1"},
}
MODEL_FLAGS = ("preset", "img_size", "model_args")


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m eval.reproduce` (no torch: --help answers at once)."""
    parser = cli.make_parser("python -m eval.reproduce", __doc__)
    parser.add_argument("--budget", choices=tuple(BUDGETS), default=None,
                        help="quick: CPU wiring check (minutes, not a result); cpu: the calibrated CPU "
                             "table; gpu: every mask x 3 seeds on one H100-class GPU (estimate printed "
                             "first); full: longer (default: full)")
    parser.add_argument("--quick", action="store_true", help="same as --budget quick (default: off)")
    parser.add_argument("--masks", default=None,
                        help="comma-separated mask types (default: every one of noise.MASK_TYPES)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the budget's)")
    parser.add_argument("--preset", default=None,
                        help="model.PRESETS name (default: the budget's, else demo)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="image side (default: the budget's, else 32)")
    parser.add_argument("--model-args", default=None,
                        help="comma-separated build_mae sizes over the preset's, e.g. embed_dim=48,depth=3 "
                             "(default: the budget's, else none)")
    for name in BUDGET_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help="default: " + ", ".join(f"{budget} {values[name]}"
                                                         for budget, values in BUDGETS.items()))
    parser.add_argument("--base-lr", type=float, default=1.5e-3,
                        help="lr = base_lr * batch / 256 (as configs/demo.yaml; MAE's is 1.5e-4) "
                             "(default: %(default)s)")
    parser.add_argument("--pool", choices=("cls", "avg"), default="avg",
                        help="feature for k-NN / linear (default: %(default)s)")
    parser.add_argument("--data", default=None,
                        help="Fashion-MNIST IDX files or class folders (default: the Debian package's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto = cuda when available (default: %(default)s)")
    parser.add_argument("--json", default=None, help="write per-run metrics and timings here (default: none)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results.md"),
                        help="Markdown report (default: docs/results.md)")
    parser.add_argument("--charts", default=None,
                        help="folder for the per-seed charts (default: <--out without .md>-charts)")
    return parser


if __name__ == "__main__":  # --help and usage errors answer here, before torch loads
    build_parser().parse_args()

# The imports below follow the early parse on purpose (hence the noqa).
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py: before torch loads (shared CPU cores)
from collections.abc import Iterator  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from configs import Config, TrainConfig  # noqa: E402
from configs.fingerprint import digest_of  # noqa: E402
from eval import finetune, knn, linear_probe, seg_data, segmentation  # noqa: E402
from eval import reproduce_report as report  # noqa: E402
from eval.features import extract_tokens  # noqa: E402
from eval.reproduce_report import UNTRAINED  # noqa: E402
from model import build_mae, load_encoder  # noqa: E402
from noise import MASK_TYPES, MaskGenerator, mask_to_torch  # noqa: E402
from train import Run, autocast_dtype, build_optimizer, train_step  # noqa: E402

GPU_MINUTES = 8.0  # --budget gpu's target on one H100 (timed with 5 masks, before white, untrained, finetune)
WARMUP_SHARE = 0.1  # of all optimiser steps
MASK_RATIO = 0.75
FINETUNE = {"lr": 1e-3, "weight_decay": 0.05, "layer_decay": 0.65, "drop_path": 0.1, "smoothing": 0.1,
            "warmup_epochs": 1, "batch_size": 32}  # eval.finetune's defaults, a smaller batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line -> settings, the budget's values filling what the flags leave open."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.quick and args.budget not in (None, "quick"):
        parser.error(f"--quick and --budget {args.budget} contradict each other")
    args.budget = "quick" if args.quick else args.budget or "full"
    for name, value in {"preset": "demo", "img_size": 32, "model_args": "", **BUDGETS[args.budget]}.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    try:
        args.model_args = {key.strip(): int(value) for key, value in
                           (item.split("=") for item in args.model_args.split(",") if item.strip())}
    except ValueError:
        parser.error(f"--model-args {args.model_args!r}: expected key=integer items such as depth=3")
    args.masks = [m.strip() for m in (args.masks or ",".join(MASK_TYPES)).split(",") if m.strip()]
    unknown = sorted(set(args.masks) - set(MASK_TYPES))
    if unknown:
        parser.error(f"--masks: unknown mask types {unknown}; allowed: {', '.join(MASK_TYPES)}")
    args.seeds = [int(s) for s in str(args.seeds).split(",")]
    args.data = args.data or seg_data.FASHION_MNIST_DIR
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
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


def load_data(args: argparse.Namespace) -> dict:
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


def model_overrides(args: argparse.Namespace) -> dict:
    """build_mae's keyword arguments besides the preset: the image size and --model-args."""
    return {"img_size": args.img_size, **args.model_args}


def initial_model(seed: int, args: argparse.Namespace) -> torch.nn.Module:
    """The MAE every mask type of `seed` starts from: the same seed gives identical weights."""
    with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG state alone
        torch.manual_seed(seed)
        return build_mae(args.preset, **model_overrides(args)).to(args.device)


def training_batches(pixels: torch.Tensor, masks: MaskGenerator, seed: int, args: argparse.Namespace
                     ) -> Iterator[dict]:
    """The batches of one whole pretraining, in order, as train_step takes them: {"images", "mask"}.

    The images depend on the seed only, never on the mask.
    """
    generator = torch.Generator(device=pixels.device).manual_seed(seed)
    steps = len(pixels) // args.batch_size
    for epoch in range(args.epochs):
        order = torch.randperm(len(pixels), device=pixels.device, generator=generator)
        for index, batch in enumerate(order[: steps * args.batch_size].view(steps, -1)):
            images = random_resized_crop(pixels[batch], args.img_size, generator)
            yield {"images": images, "mask": mask_to_torch(masks(len(images), epoch=epoch, index=index),
                                                          pixels.device)}


def pretrain(mask: str, seed: int, data: dict, args: argparse.Namespace, max_steps: int | None = None
             ) -> tuple[torch.nn.Module, float, float]:
    """MAE pretraining with one mask type through train.py's step; returns (model, seconds, mean loss of
    the last epoch). `max_steps` stops early (the timing run before the table); the schedule stays the
    full one."""
    device = torch.device(args.device)
    mae = initial_model(seed, args)
    steps_per_epoch = len(data["train_pixels"]) // args.batch_size
    total = args.epochs * steps_per_epoch
    cfg = Config(train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr,
                                   seed=seed))
    optimizer, scheduler = build_optimizer(mae, cfg.train, cfg.lr, total_steps=total,
                                           warmup_steps=max(1, int(WARMUP_SHARE * total)),
                                           fused=device.type == "cuda")
    # the parts train_step uses; no run folder, loader or tracker: the batches come from the device
    run = Run(cfg=cfg, folder=Path(), rank=0, world=1, device=device, model=mae, ddp=mae.train(), loader=None,
              micro_batch=args.batch_size, steps_per_epoch=steps_per_epoch, fingerprint="",
              optimizer=optimizer, scheduler=scheduler, dtype=autocast_dtype("auto", device),
              scaler=torch.amp.GradScaler(device.type, enabled=False), tracker=None)
    masks = MaskGenerator(mask, grid=args.img_size // mae.patch_size, mask_ratio=MASK_RATIO, seed=seed,
                          device=str(device))
    batches = training_batches(data["train_pixels"], masks, seed, args)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start, losses = time.perf_counter(), []
    for step in range(total if max_steps is None else min(max_steps, total)):
        losses = [] if step % steps_per_epoch == 0 else losses
        losses.append(train_step(run, batches)["loss"])
    synchronize()
    mean_loss = torch.stack(losses).mean().item() if losses else 0.0  # the step leaves each on the device
    return mae.eval(), time.perf_counter() - start, mean_loss


def estimate_seconds(data: dict, args: argparse.Namespace, probe_seconds: float) -> float:
    """Time of the whole table from a few timed steps (after a warm-up) and one probe pass."""
    steps = args.epochs * (len(data["train_pixels"]) // args.batch_size)
    warmup = min(3, steps // 2)
    timed = max(1, min(10, steps - warmup))
    first = pretrain(args.masks[0], args.seeds[0], data, args, max_steps=warmup)[1]
    both = pretrain(args.masks[0], args.seeds[0], data, args, max_steps=warmup + timed)[1]
    step_seconds = max(both - first, 0.0) / timed
    runs = len(args.masks) * len(args.seeds)
    total = runs * steps * step_seconds + (runs + len(args.seeds)) * probe_seconds
    print(f"estimate: {total / 60:.1f} min = {runs} runs x {steps} steps x {1000 * step_seconds:.1f} ms "
          f"+ {runs + len(args.seeds)} x {probe_seconds:.0f} s of probes", flush=True)
    if args.budget == "gpu" and total > 60 * GPU_MINUTES:
        print(f"warning: over the gpu budget's {GPU_MINUTES:.0f} minutes on this device; lower --epochs",
              flush=True)
    return total


def finetune_accuracy(mae: torch.nn.Module, data: dict, seed: int, args: argparse.Namespace) -> float:
    """Low-label fine-tuning (eval.finetune's recipe): the whole encoder and a new linear head on the
    first --finetune-images training images, test top-1. Per seed, the head, the batches and the
    drop-path draws are the same for every encoder."""
    n, size = args.finetune_images, args.img_size
    encoder = load_encoder({"model": mae.state_dict(), "model_args": mae.model_args}, num_classes=10,
                           global_pool="avg", drop_path_rate=FINETUNE["drop_path"])
    train = TensorDataset(to_model_input(data["train_pixels"][:n], size), data["train_labels"][:n])
    test = TensorDataset(to_model_input(data["test_pixels"], size), data["test_labels"])
    settings = argparse.Namespace(**FINETUNE, epochs=args.finetune_epochs, device=args.device, mixup=0,
                                  cutmix=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder.reset_classifier(10)
        loader = DataLoader(train, FINETUNE["batch_size"], shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(seed))
        return finetune.finetune(encoder, loader, DataLoader(test, 256), settings, num_classes=10)


def probe(mae: torch.nn.Module | None, data: dict, args: argparse.Namespace, seed: int = 0
          ) -> dict[str, float]:
    """k-NN, linear, segmentation and fine-tuning probes of an encoder, or the first three of raw pixels
    when mae is None."""
    train_images = to_model_input(data["train_pixels"], args.img_size)
    test_images = to_model_input(data["test_pixels"], args.img_size)
    (seg_train, seg_train_labels), (seg_test, seg_test_labels) = data["seg_train"], data["seg_test"]
    if mae is None:
        train, test = train_images[:, 0].flatten(1), test_images[:, 0].flatten(1)
        patch = build_mae(args.preset, **model_overrides(args)).patch_size
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
    scores = {"knn": knn.knn_accuracy(train, labels[0], test, labels[1]),
              "linear": linear_probe.linear_probe_accuracy(train, labels[0], test, labels[1],
                                                           epochs=args.probe_epochs),
              "miou": seg["miou"]}
    if mae is not None and args.finetune_images:
        scores["finetune"] = finetune_accuracy(mae, data, seed, args)
    return scores


def settings_fingerprint(data: dict, args: argparse.Namespace) -> str:
    """What every run of the table shares (budget, model, optimiser, data content): all but mask and seed."""
    settings = {name: getattr(args, name) for name in (*BUDGET_FLAGS, *MODEL_FLAGS, "base_lr", "pool")}
    content = hashlib.sha1(data["train_pixels"].cpu().numpy().tobytes()).hexdigest()[:12]
    return digest_of({**settings, "warmup_share": WARMUP_SHARE, "mask_ratio": MASK_RATIO, "data": content,
                      "finetune": FINETUNE})


def main(argv: list[str] | None = None) -> dict:
    """Pretrain every mask type per seed, probe each run, each seed's untrained encoder and the raw
    pixels; write the report, its charts and, with --json, the figures."""
    args = parse_args(argv)
    started = time.perf_counter()
    data = load_data(args)
    baseline = probe(None, data, args)
    print(f"raw pixels: {baseline}", flush=True)
    fingerprint = settings_fingerprint(data, args)
    runs, estimate = [], None
    for seed in args.seeds:
        probe_start = time.perf_counter()  # an untrained encoder costs what a trained one does to probe
        runs.append({"mask": UNTRAINED, "seed": seed, **probe(initial_model(seed, args), data, args, seed),
                     "pretrain_seconds": 0.0, "loss": None, "fingerprint": fingerprint})
        print(json.dumps(runs[-1]), flush=True)
        if estimate is None:
            estimate = estimate_seconds(data, args, probe_seconds=time.perf_counter() - probe_start)
        for mask in args.masks:
            mae, seconds, loss = pretrain(mask, seed, data, args)
            runs.append({"mask": mask, "seed": seed, **probe(mae, data, args, seed),
                         "pretrain_seconds": seconds, "loss": loss, "fingerprint": fingerprint})
            print(json.dumps(runs[-1]), flush=True)
    elapsed = time.perf_counter() - started
    out = Path(args.out)
    charts = report.write_charts(runs, Path(args.charts or out.with_name(f"{out.stem}-charts")))
    report.write_report(runs, baseline, args, {name: getattr(args, name) for name in BUDGET_FLAGS}, out,
                        elapsed, charts)
    result = {"runs": runs, "raw_pixels": baseline, "hardware": report.hardware(args.device),
              "seconds": elapsed, "estimated_seconds": estimate, "budget_name": args.budget,
              "budget": {name: getattr(args, name) for name in (*BUDGET_FLAGS, *MODEL_FLAGS)}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else "") + f" in {elapsed / 60:.1f} min")
    return result


if __name__ == "__main__":
    main()
