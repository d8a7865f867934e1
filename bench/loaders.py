"""Loader throughput: images/s of each backend with and without the mask stage, against decode-only.

    python -m bench.loaders [--data DIR] --json runs/bench-loaders.json
    python -m bench.loaders --device cuda --batch-size 256 --json runs/bench-loaders-gpu.json

Without --data the ImageNet-like JPEG corpus is built first (pipelines.prepare jpeg-corpus). Every
backend runs the training transform at S=224 (batch 64 by default), all cores, on --device (on a GPU:
torch with pinned memory and non-blocking copies, DALI with 'mixed' decode, ffcv with ToDevice). A
backend whose package is missing gets a row `skipped: missing <package>`. The peer is what a user
would write without this repository: torchvision's ImageFolder and a DataLoader with public MAE's
transform (same crop scale, flip and normalisation), pinned memory on a GPU, no mask stage.

Each loader first runs an untimed epoch (ffcv compiles its pipeline then), then every round times
one full epoch of each loader and two references on the same files: decode-only (the reference
limit: on the CPU the best of PIL and DALI's CPU decoder with the same worker count; on a GPU the
best of DALI 'mixed' and torchvision's nvJPEG decode, no augmentation) and decode + transform
(torchvision decode and the torch backend's training transform in plain threads, no loader: what
the transform itself costs). The mask stage's cost is reported twice: from the rates with and
without it (noisy on a shared machine), and from the stage's own timer as a share of the epoch.
Each figure is the median over rounds, to damp the load of other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from bench.deps import skip_reason
from pipelines import BACKENDS, LOADERS, LoaderConfig, build_loader, scan
from pipelines.base import IMAGENET_MEAN, IMAGENET_STD, TRAIN_SCALE
from pipelines.prepare import prepare_jpeg_corpus
from pipelines.torch_loader import build_transform

PEER = "imagefolder"


class ImageFolderPeer:
    """The peer: torchvision ImageFolder + DataLoader with public MAE's training transform, as a user
    would write it (PIL decode and crop in the workers, shuffled, pinned memory on a GPU, no masks)."""

    masks = None

    def __init__(self, root: Path, img_size: int, batch_size: int, workers: int, device: str):
        transform = transforms.Compose([
            transforms.RandomResizedCrop(img_size, scale=TRAIN_SCALE,
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
        self.device = torch.device(device)
        # allow_empty: the manifest's hidden cache folder is one more (empty) class to ImageFolder
        dataset = ImageFolder(str(root), transform, allow_empty=True)
        self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                 pin_memory=self.device.type == "cuda", drop_last=True,
                                 persistent_workers=workers > 0)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to select: the DataLoader reshuffles every epoch."""

    def __iter__(self) -> Iterator[dict]:
        for images, labels in self.loader:
            yield {"images": images.to(self.device, non_blocking=True),
                   "labels": labels.to(self.device, non_blocking=True)}


def warm_loader(loader):
    """The loader after one untimed epoch (page cache, worker start, ffcv's JIT compilation)."""
    for _ in loader:
        pass
    return loader


def epoch_rate(loader, epoch: int, device: torch.device) -> tuple[float, float]:
    """Images/s of one full epoch (device work included), and the share of it spent in the mask stage."""
    loader.set_epoch(epoch)
    mask_start = loader.masks.seconds if loader.masks else 0.0
    images, start = 0, time.perf_counter()
    for batch in loader:
        images += len(batch["labels"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    mask_seconds = (loader.masks.seconds - mask_start) if loader.masks else 0.0
    return images / seconds, mask_seconds / seconds


def threaded_rate(work: Callable[[str], object], files: list[str], workers: int) -> float:
    """Images/s of `work(path)` over `files` in a pool of threads (Pillow and torch release the GIL)."""
    with ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(work, files))
        return len(files) / (time.perf_counter() - start)


def pil_decode_rate(files: list[str], workers: int) -> float:
    def decode(path: str) -> None:
        with Image.open(path) as img:
            img.convert("RGB")

    return threaded_rate(decode, files, workers)


def transform_rate(files: list[str], workers: int, img_size: int) -> float:
    """torchvision decode + the torch backend's training transform in threads, without a loader."""
    transform = build_transform(img_size, train=True, normalise=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one intra-op thread per worker thread, as in a DataLoader worker
    try:
        return threaded_rate(lambda path: transform(decode_image(read_file(path), mode=ImageReadMode.RGB)),
                             files, workers)
    finally:
        torch.set_num_threads(threads)


def dali_decode_rate(files: list[str], workers: int, batch_size: int, gpu: bool) -> float:
    """DALI's image decoder alone: 'mixed' (nvJPEG on the GPU) or 'cpu'."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=0 if gpu else None)
    def decode_only():
        data, _ = fn.readers.file(files=files, name="reader")
        return fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)

    pipe = decode_only()
    pipe.build()
    batches = -(-len(files) // batch_size)
    pipe.run()  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * batch_size / (time.perf_counter() - start)


def nvjpeg_decode_rate(files: list[str], workers: int, batch_size: int) -> float:
    """torchvision's batched nvJPEG decode on the GPU (files read in threads): the limit without DALI."""
    with ThreadPoolExecutor(workers) as pool:
        decode_jpeg(list(pool.map(read_file, files[:batch_size])), device="cuda")  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, len(files), batch_size):
            data = list(pool.map(read_file, files[first : first + batch_size]))
            decode_jpeg(data, device="cuda", mode=ImageReadMode.RGB)
        torch.cuda.synchronize()
        return len(files) / (time.perf_counter() - start)


def decode_rates(files: list[str], workers: int, batch_size: int, gpu: bool) -> dict[str, float]:
    """Decode-only images/s of every decoder available on this device."""
    dali = skip_reason("nvidia.dali") is None
    if gpu:
        rates = {"nvjpeg": nvjpeg_decode_rate(files, workers, batch_size)}
        if dali:
            rates["dali-mixed"] = dali_decode_rate(files, workers, batch_size, gpu=True)
        return rates
    rates = {"pil": pil_decode_rate(files, workers)}
    if dali:
        rates["dali-cpu"] = dali_decode_rate(files, workers, batch_size, gpu=False)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loaders", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="class folder (default: build the corpus)")
    parser.add_argument("--corpus", type=Path, default=Path("runs/jpeg-corpus"), help="where to build it")
    parser.add_argument("--n", type=int, default=2000, help="corpus size when building it")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--loaders", default=",".join([*LOADERS, PEER]))
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]': where batches are delivered")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; figures are their medians")
    args = parser.parse_args()

    device = torch.device(args.device)
    data = args.data or prepare_jpeg_corpus(args.corpus, n=args.n)
    files = scan(data).files
    results, loaders = [], {}
    for name in args.loaders.split(","):
        reason = skip_reason(*BACKENDS[name].packages) if name in BACKENDS else None
        if reason:
            results.append({"loader": name, "device": device.type, "skipped": reason})
            print(f"{name}: {reason}", flush=True)
            continue
        if name == PEER:
            peer = ImageFolderPeer(data, args.img_size, args.batch_size, args.workers, args.device)
            loaders[name, False] = warm_loader(peer)
            continue
        for mask in (False, True):
            loaders[name, mask] = warm_loader(build_loader(LoaderConfig(
                loader=name, data=str(data), img_size=args.img_size, batch_size=args.batch_size,
                workers=args.workers, train=True, schedule="green" if mask else None, device=args.device,
            )))  # fmt: skip

    # Rounds interleave every measurement, so load from other processes hits all of them alike.
    decode, transform = {}, []
    rates, mask_shares = {key: [] for key in loaders}, {key: [] for key in loaders}
    on_gpu = device.type == "cuda"
    for round_ in range(1, args.rounds + 1):
        for decoder, rate in decode_rates(files, args.workers, args.batch_size, on_gpu).items():
            decode.setdefault(decoder, []).append(rate)
        transform.append(transform_rate(files, args.workers, args.img_size))
        print(f"round {round_}: decode-only " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in decode.items())
              + f"; decode + transform {transform[-1]:.1f} images/s", flush=True)
        order = list(loaders.items())
        for key, loader in order if round_ % 2 else order[::-1]:  # alternate: no fixed neighbours
            rate, share = epoch_rate(loader, round_, device)
            rates[key].append(rate)
            mask_shares[key].append(share)
            print(f"round {round_}: {key[0]:11s} mask={key[1]!s:5s} {rate:8.1f} images/s", flush=True)

    decoders = {name: statistics.median(values) for name, values in decode.items()}
    limit_name = max(decoders, key=decoders.get)
    limit, transform_median = decoders[limit_name], statistics.median(transform)
    median = {key: statistics.median(values) for key, values in rates.items()}
    for (name, mask), rate in median.items():
        result = {"loader": name, "device": device.type, "mask": mask, "images_per_s": round(rate, 1),
                  "vs_decode_only": round(rate / limit, 3)}
        if mask:
            result["mask_stage_share"] = round(statistics.median(mask_shares[name, mask]), 5)
        results.append(result)
    print(f"decode-only ({limit_name}): {limit:.1f} images/s, decode + transform: {transform_median:.1f} "
          f"images/s ({len(files)} files, {args.workers} workers, {device.type})")
    for name, mask in median:
        if mask:
            cost = 1 - median[name, True] / median[name, False]
            share = statistics.median(mask_shares[name, True])
            print(f"{name:5s} mask stage: {100 * cost:+.1f}% from the rates, "
                  f"{100 * share:.2f}% of the epoch by its own timer")
    peer = median.get((PEER, False))
    for (name, mask), rate in median.items():
        versus_peer = f", {rate / peer:.2f}x the {PEER} peer" if peer else ""
        print(f"{name:11s} mask={mask!s:5s} {rate / limit:.2f}x decode-only, "
              f"{rate / transform_median:.2f}x decode + transform{versus_peer}")
    report = {"device": device.type, "batch_size": args.batch_size, "img_size": args.img_size,
              "files": len(files), "workers": args.workers, "results": results,
              "decode_only": {name: round(rate, 1) for name, rate in decoders.items()},
              "decode_only_images_per_s": round(limit, 1), "decode_only_decoder": limit_name,
              "decode_transform_images_per_s": round(transform_median, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
