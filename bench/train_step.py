"""MAE train-step throughput and peak memory: synthetic batches and the real torch loader.

    python bench/train_step.py --json runs/bench-train-step.json
    python bench/train_step.py --models vit_small --batch 64 --inputs loader --data runs/jpeg-corpus

Each row times full steps (forward, backward, AdamW) after warm-up: images/s, peak memory
(torch.cuda.max_memory_allocated on GPU, the process's RSS high-water mark on CPU; loader workers
are separate processes and not counted) and the share of time spent waiting for the next batch.
For synthetic input the same model is also timed as the public MAE release runs it (eager
attention, shuffle / gather / unshuffle masking); "baseline" lists both and the speed-up.
"""

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from model import MaskedAutoencoderViT, build_mae  # noqa: E402
from noise import MaskGenerator, mask_to_torch  # noqa: E402

MODELS = ("demo", "vit_tiny", "vit_small", "vit_base")
CPU_BATCH = {"demo": 128, "vit_tiny": 32, "vit_small": 64, "vit_base": 8}
GPU_BATCH = {"demo": 1024, "vit_tiny": 256, "vit_small": 256, "vit_base": 256}


class PublicStyleMAE(MaskedAutoencoderViT):
    """The same network run as the public MAE release does: eager softmax attention, masking by
    shuffling tokens with argsort noise, and a decoder that concatenates mask tokens then unshuffles."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for block in [*self.blocks, *self.decoder_blocks]:
            block.attn.fused_attn = False

    def forward(self, imgs, mask=None, mask_ratio=0.75):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        b, n, d = x.shape
        keep = int(n * (1 - mask_ratio))
        ids_shuffle = torch.rand(b, n, device=x.device).argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.decoder_embed(self.norm(x))
        tokens = torch.cat([x[:, 1:], self.mask_token.repeat(b, n - keep, 1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        return self.forward_loss(imgs, pred, mask), pred, mask


def synthetic_batches(args: dict, batch: int, device: torch.device) -> Iterator[dict]:
    """A few random image batches with uniform random masks from the mask stage, cycled."""
    grid = args["img_size"] // args["patch_size"]
    masks = MaskGenerator("random", grid=grid, seed=0)
    pool = [{"images": torch.randn(batch, 3, args["img_size"], args["img_size"], device=device),
             "mask": mask_to_torch(masks(batch), device)} for _ in range(2)]
    while True:
        yield from pool


def loader_batches(args: dict, batch: int, device: torch.device, data: Path, workers: int) -> Iterator[dict]:
    """Batches from the torch loader (green masks), epoch after epoch."""
    from pipelines import LoaderConfig, build_loader

    cfg = LoaderConfig(loader="torch", data=str(data), img_size=args["img_size"],
                       patch_size=args["patch_size"], batch_size=batch, workers=workers,
                       mask="green", device=str(device))
    loader = build_loader(cfg)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing 5 resets the RSS high-water mark that getrusage reports; elsewhere the mark
    # covers the whole process so far.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def time_steps(model: torch.nn.Module, batches: Iterator[dict], steps: int, warmup: int,
               device: torch.device, dtype: torch.dtype) -> dict:
    """Run warmup + steps training steps; images/s, peak memory and data-wait share of the timed part."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    images = waited = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            reset_peak_memory(device)
            images = waited = 0.0
            start = time.perf_counter()
        fetch = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - fetch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _, _ = model(batch["images"].to(device, non_blocking=True), batch["mask"].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images += batch["images"].shape[0]
    sync()
    elapsed = time.perf_counter() - start
    return {"images_per_s": round(images / elapsed, 2), "peak_mem_mb": round(peak_memory_mb(device), 1),
            "data_wait": round(waited / elapsed, 4)}


def corpus_root(data: Path | None, n: int) -> Path:
    """The class-folder root for loader rows: --data, else a JPEG corpus made (once) by pipelines.prepare."""
    if data is None:
        data = ROOT / "runs" / "jpeg-corpus"
        subprocess.run([sys.executable, "-m", "pipelines.prepare", "jpeg-corpus", "--out", str(data),
                        "--n", str(n)], cwd=ROOT, check=True)
    return data


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list from {MODELS}")
    p.add_argument("--inputs", default="synthetic,loader", help="comma list: synthetic, loader")
    p.add_argument("--batch", type=int,
                   help=f"batch for every model (default {GPU_BATCH if cuda else CPU_BATCH})")
    p.add_argument("--steps", type=int, default=20 if cuda else 2, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5 if cuda else 1, help="untimed steps first")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16" if cuda else "fp32",
                   help="autocast dtype (default bf16 on GPU, fp32 on CPU; bf16 on CPU needs AMX or "
                   "AVX512-BF16 to pay off)")
    p.add_argument("--data", type=Path, help="class-folder JPEG root for loader rows "
                   "(default: runs/jpeg-corpus, made with `python -m pipelines.prepare jpeg-corpus`)")
    p.add_argument("--demo-data", type=Path, default=ROOT / "data" / "fashion-mnist" / "train",
                   help="class-folder root for the demo's loader rows when it exists (else --data)")
    p.add_argument("--corpus-size", type=int, default=2000, help="images when making the default corpus")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: CPU count)")
    p.add_argument("--no-baseline", action="store_true", help="skip the public-MAE-style comparison")
    p.add_argument("--rounds", type=int, default=2,
                   help="baseline: time ours and public alternately this many times each, keep the best")
    args = p.parse_args()
    args.models = args.models.split(",")
    args.inputs = args.inputs.split(",")
    for name in args.models:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {MODELS}")
    for name in args.inputs:
        if name not in ("synthetic", "loader"):
            p.error(f"unknown input {name!r}; choose from synthetic, loader")
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    data = corpus_root(args.data, args.corpus_size) if "loader" in args.inputs else None
    workers = args.workers or torch.multiprocessing.cpu_count()
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "precision": args.precision, "results": [], "baseline": []}
    for name in args.models:
        torch.manual_seed(0)
        model = build_mae(name).to(device)
        margs = model.model_args
        batch = args.batch or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[name]
        folder = args.demo_data if name == "demo" and args.demo_data.is_dir() else data
        for source in args.inputs:
            batches = (synthetic_batches(margs, batch, device) if source == "synthetic"
                       else loader_batches(margs, batch, device, folder, workers))
            row = {"model": name, "img_size": margs["img_size"], "batch": batch, "input": source,
                   **time_steps(model, batches, args.steps, args.warmup, device, dtype)}
            out["results"].append(row)
            print(json.dumps(row), flush=True)
            if source == "synthetic" and not args.no_baseline:
                out["baseline"].append(compare_public(model, row, args, device, dtype))
                print(json.dumps(out["baseline"][-1]), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")


def compare_public(model: MaskedAutoencoderViT, ours: dict, args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype) -> dict:
    """Time the public-MAE-style step on the same weights and batch, alternating with ours (best of
    --rounds each, so a busy machine hurts both alike); speed-up of ours over it."""
    margs = {k: v for k, v in model.model_args.items() if k != "preset"}
    public = PublicStyleMAE(**margs).to(device)
    public.load_state_dict(model.state_dict())
    best = {"ours": ours, "public": None}
    runs = [("public", public), *[(key, net) for _ in range(args.rounds - 1)
                                  for key, net in (("ours", model), ("public", public))]]
    for key, net in runs:
        timed = time_steps(net, synthetic_batches(margs, ours["batch"], device), args.steps, args.warmup,
                           device, dtype)
        if best[key] is None or timed["images_per_s"] > best[key]["images_per_s"]:
            best[key] = timed
    mine, theirs = best["ours"], best["public"]
    return {"model": ours["model"], "img_size": ours["img_size"], "batch": ours["batch"],
            "images_per_s": mine["images_per_s"], "public_style_images_per_s": theirs["images_per_s"],
            "speedup": round(mine["images_per_s"] / theirs["images_per_s"], 3),
            "peak_mem_mb": mine["peak_mem_mb"], "public_style_peak_mem_mb": theirs["peak_mem_mb"]}


if __name__ == "__main__":
    main()
