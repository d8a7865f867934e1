"""Mask-stage throughput: colour-noise masks vs public MAE's random masking, in one run.

    .venv/bin/python -m bench.masks --json runs/bench/masks.json [--device cuda:0] [--batches 256,4096]

``random_torch`` draws masks as public MAE does (torch.rand, argsort, the restore indices and
the binary mask, on the same device). Every figure is the best of ``--repeats`` interleaved
timings after a warm-up, because the machine may be shared. Targets: every colour >= 2x
``random_torch`` at B=256 and >= 1x at B=4096; the five default banks generate in < 2 s.
"""

import argparse
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from noise import COLOURS, MaskGenerator, bank_params, get_xp
from noise.bank import generate_bank

BATCHES = (256, 4096)
GRID = 14
MASK_RATIO = 0.75


def random_torch(batch: int, num_patches: int, keep: int, device: str):
    """Public MAE's random masking: ids_keep, ids_restore and the 0/1 mask (1 = masked)."""
    noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep] = 0
    return ids_keep, ids_restore, torch.gather(mask, 1, ids_restore)


def synchronizer(device: str) -> Callable[[], None]:
    """Waits for queued GPU work (torch and CuPy) so timings cover it; nothing to wait for on CPU."""
    if device == "cpu":
        return lambda: None
    xp = get_xp(device)
    return lambda: (torch.cuda.synchronize(device), xp.cuda.Device().synchronize())


def masks_per_second(
    draw: Callable[[int], object], batch: int, sync: Callable[[], None], seconds: float
) -> float:
    """Masks per second of ``draw(batch)`` over at least ``seconds``, after a warm-up."""
    for _ in range(3):
        draw(batch)
    sync()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        draw(batch)
        calls += 1
    sync()
    return calls * batch / (time.perf_counter() - start)


def batches_of(generator: MaskGenerator) -> Callable[[int], object]:
    """``draw(batch)`` giving the generator's masks of the next batch index, as a loader asks for them."""
    indices = itertools.count()
    return lambda batch: generator(batch, epoch=0, index=next(indices))


def bank_seconds() -> dict[str, float]:
    """Seconds to generate each colour's default bank from scratch (no cache)."""
    timings = {}
    for colour in COLOURS:
        start = time.perf_counter()
        generate_bank(bank_params(colour))
        timings[colour] = round(time.perf_counter() - start, 4)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.masks", description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds; the best counts")
    parser.add_argument("--seconds", type=float, default=0.3, help="minimum timing per measurement")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="comma list of batch sizes (the targets: first = B=256, last = B=4096)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch CPU threads for random_torch (1 = like the single-threaded numpy sampler, and "
        "torch's fastest setting on a busy 2-core machine; 0 = torch's default)",
    )
    args = parser.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    batches = [int(b) for b in args.batches.split(",")]
    sync = synchronizer(args.device)
    num_patches = GRID * GRID
    keep = int(num_patches * (1 - MASK_RATIO))
    methods: dict[str, Callable[[int], object]] = {
        colour: batches_of(MaskGenerator(colour, GRID, MASK_RATIO, device=args.device)) for colour in COLOURS
    }
    methods["random_torch"] = lambda batch: random_torch(batch, num_patches, keep, args.device)

    best: dict[tuple[str, int], float] = {}
    for _ in range(args.repeats):
        for batch in batches:
            for method, draw in methods.items():
                rate = masks_per_second(draw, batch, sync, args.seconds)
                best[method, batch] = max(rate, best.get((method, batch), 0.0))

    report = {
        "results": [
            {"method": method, "batch": batch, "grid": GRID, "masks_per_s": round(rate, 1)}
            for (method, batch), rate in best.items()
        ],
        "bank_seconds": bank_seconds(),
        "ratios_vs_random_torch": {
            colour: {str(b): round(best[colour, b] / best["random_torch", b], 2) for b in batches}
            for colour in COLOURS
        },
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")

    ratios = report["ratios_vs_random_torch"]
    small, large = str(batches[0]), str(batches[-1])
    fast_enough = all(r[small] >= 2 and r[large] >= 1 for r in ratios.values())
    bank_total = sum(report["bank_seconds"].values())
    print(f"colours >= 2x random_torch at B={small} and >= 1x at B={large}: {'yes' if fast_enough else 'NO'}")
    verdict = "yes" if bank_total < 2 else "NO"
    print(f"default banks of all colours: {bank_total:.2f} s (target < 2 s): {verdict}")


if __name__ == "__main__":
    main()
