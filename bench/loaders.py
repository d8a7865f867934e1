"""Loader throughput: images/s of each backend with and without the mask stage, against decode-only.

    python bench/loaders.py [--data DIR] --json runs/bench-loaders.json

Without --data the ImageNet-like JPEG corpus is built first (pipelines.prepare jpeg-corpus). Every
backend runs the training transform at S=224, batch 64, all cores; each loader first runs an untimed
epoch (ffcv compiles its pipeline then), then every round times one full epoch of each loader and
the decode-only rate (the best of PIL and DALI's CPU decoder on the same files, same worker count,
no augmentation: the reference limit) and the decode + transform rate (torchvision decode and the
torch backend's training transform in plain threads, no loader: what the transform itself costs).
The mask stage's cost is reported twice: from the rates with and without it (noisy on a shared
machine), and from the stage's own timer as a share of the epoch. Each figure is the median over
rounds, to damp the load of other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, read_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import LOADERS, LoaderConfig, build_loader, scan
from pipelines.prepare import prepare_jpeg_corpus
from pipelines.torch_loader import build_transform


def warm_loader(cfg: LoaderConfig):
    """A loader after one untimed epoch (page cache, worker start, ffcv's JIT compilation)."""
    loader = build_loader(cfg)
    for _ in loader:
        pass
    return loader


def epoch_rate(loader, epoch: int) -> tuple[float, float]:
    """Images/s of one full epoch, and the share of its time spent in the mask stage."""
    loader.set_epoch(epoch)
    mask_start = loader.masks.seconds if loader.masks else 0.0
    images, start = 0, time.perf_counter()
    for batch in loader:
        images += len(batch["labels"])
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


def dali_decode_rate(files: list[str], workers: int, batch_size: int) -> float:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=workers, device_id=None)
    def decode_only():
        data, _ = fn.readers.file(files=files, name="reader")
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    pipe = decode_only()
    pipe.build()
    batches = -(-len(files) // batch_size)
    pipe.run()  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=None, help="class folder (default: build the corpus)")
    parser.add_argument("--corpus", type=Path, default=Path("runs/jpeg-corpus"), help="where to build it")
    parser.add_argument("--n", type=int, default=2000, help="corpus size when building it")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--loaders", default=",".join(LOADERS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; figures are their medians")
    args = parser.parse_args()

    data = args.data or prepare_jpeg_corpus(args.corpus, n=args.n)
    files = scan(data).files
    names = args.loaders.split(",")
    runs = [(name, "cpu", mask) for name in names for mask in (False, True)]
    if torch.cuda.is_available() and "dali" in names:
        runs += [("dali", "cuda", mask) for mask in (False, True)]  # DALI 'mixed' decode on the GPU
    loaders = {}
    for name, device, mask in runs:
        loaders[name, device, mask] = warm_loader(LoaderConfig(
            loader=name, data=str(data), img_size=args.img_size, batch_size=args.batch_size,
            workers=args.workers, train=True, mask="green" if mask else None, device=device,
        ))  # fmt: skip

    # Rounds interleave every measurement, so load from other processes hits all of them alike.
    decode_rates, transform_rates = [], []
    rates, mask_shares = {key: [] for key in loaders}, {key: [] for key in loaders}
    for round_ in range(1, args.rounds + 1):
        pil = pil_decode_rate(files, args.workers)
        dali = dali_decode_rate(files, args.workers, args.batch_size)
        decode_rates.append(max(pil, dali))  # the fastest available decoder
        transform_rates.append(transform_rate(files, args.workers, args.img_size))
        print(f"round {round_}: decode-only PIL {pil:.1f}, DALI {dali:.1f}; decode + transform "
              f"{transform_rates[-1]:.1f} images/s", flush=True)
        order = list(loaders.items())
        for key, loader in order if round_ % 2 else order[::-1]:  # alternate: no fixed neighbours
            rate, share = epoch_rate(loader, round_)
            rates[key].append(rate)
            mask_shares[key].append(share)
            name, device, mask = key
            print(f"round {round_}: {name:5s} {device:4s} mask={mask!s:5s} {rate:8.1f} images/s", flush=True)

    decode, transform = statistics.median(decode_rates), statistics.median(transform_rates)
    median = {key: statistics.median(values) for key, values in rates.items()}
    results = []
    for (name, device, mask), rate in median.items():
        result = {"loader": name if device == "cpu" else f"{name}-gpu", "mask": mask,
                  "images_per_s": round(rate, 1)}
        if mask:
            result["mask_stage_share"] = round(statistics.median(mask_shares[name, device, mask]), 5)
        results.append(result)
    print(f"decode-only: {decode:.1f} images/s, decode + transform: {transform:.1f} images/s "
          f"({len(files)} files, {args.workers} workers)")
    for name, device, _ in runs[::2]:
        cost = 1 - median[name, device, True] / median[name, device, False]
        share = statistics.median(mask_shares[name, device, True])
        print(f"{name:5s} {device:4s} mask stage: {100 * cost:+.1f}% from the rates, "
              f"{100 * share:.2f}% of the epoch by its own timer")
    masked = {r["loader"]: r["images_per_s"] for r in results if r["mask"]}
    for label, rate in masked.items():
        versus_torch = f", {rate / masked['torch']:.2f}x torch" if "torch" in masked else ""
        print(f"{label:8s} {rate / decode:.2f}x decode-only, {rate / transform:.2f}x decode + transform"
              f"{versus_torch}")
    report = {"results": results, "decode_only_images_per_s": round(decode, 1),
              "decode_transform_images_per_s": round(transform, 1)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
