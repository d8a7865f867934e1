"""MAE train-step throughput, MFU and peak memory: synthetic batches and the real torch loader.

    python -m bench.train_step --json runs/bench-train-step.json
    python -m bench.train_step --models vit_small --batch 64 --inputs loader --data runs/jpeg-corpus
    python -m bench.train_step --models vit_base --inputs synthetic --compile --largest --json x.json  # GPU

Each row times full steps (forward, backward, AdamW, one host read of the loss) after warm-up:
images/s, achieved TFLOP/s and MFU from a stated FLOP count (`train_flops_per_image`; MFU needs the
GPU's peak: a datasheet table, or --peak-tflops), peak memory (torch.cuda.max_memory_allocated on
GPU, the process's RSS high-water mark on CPU; loader workers are separate processes and not
counted), the share of time spent waiting for the next batch, and the host-device syncs of one step
(torch.profiler). Defaults follow train.py: bf16 autocast on a GPU and fused AdamW.

For synthetic input the same model is also timed as the public MAE release runs it (eager attention,
per-sample torch.rand argsort masking with gather / unshuffle, fp16 autocast and a GradScaler,
unfused AdamW, .item() and a synchronize every step); "baseline" lists both and the speed-up.
--compile adds torch.compile rows (warmup_s includes the compilation); --largest doubles the
batch until a step no longer fits in device memory (or passes --max-batch).
"""

import os

# Waiting OpenMP threads sleep instead of spinning (before torch loads), as in train.py: on a few
# shared cores spinning threads make CPU steps an order of magnitude slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from model import MaskedAutoencoderViT, build_mae
from noise import MaskGenerator, mask_to_torch

ROOT = Path(__file__).resolve().parent.parent

MODELS = ("demo", "vit_tiny", "vit_small", "vit_base")
CPU_BATCH = {"demo": 128, "vit_tiny": 32, "vit_small": 64, "vit_base": 8}
GPU_BATCH = {"demo": 1024, "vit_tiny": 256, "vit_small": 256, "vit_base": 256}
MASK_RATIO = 0.75
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s), first matching name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0))
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


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
             "mask": mask_to_torch(masks(batch, epoch=0, index=index), device)} for index in range(2)]
    while True:
        yield from pool


def loader_batches(args: dict, batch: int, device: torch.device, data: Path, workers: int) -> Iterator[dict]:
    """Batches from the torch loader (green masks), epoch after epoch."""
    from pipelines import LoaderConfig, build_loader

    cfg = LoaderConfig(loader="torch", data=str(data), img_size=args["img_size"],
                       patch_size=args["patch_size"], batch_size=batch, workers=workers,
                       schedule="green", device=str(device))
    loader = build_loader(cfg)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_flops_per_image(margs: dict, mask_ratio: float = MASK_RATIO) -> float:
    """The stated FLOP count for MFU: matrix-multiply FLOPs of one training step per image.

    2 FLOPs per multiply-add; backward = 2x forward, so a step is 3x the forward. A transformer block
    of width D over N tokens costs (8 + 4 * mlp_ratio) * N * D^2 (qkv, projection, MLP) + 4 * N^2 * D
    (attention scores and values); the encoder sees 1 + K visible tokens, the decoder 1 + L. Add the
    patch embedding (all L patches), the decoder embedding and the pixel head; norms, softmax and the
    loss are left out. ViT-B/16 MAE at 224 px and 75% masking: 58.7 GFLOPs per image.
    """
    patch_pixels = margs["patch_size"] ** 2 * margs["in_chans"]
    patches = (margs["img_size"] // margs["patch_size"]) ** 2
    encoder_tokens, decoder_tokens = 1 + int(patches * (1 - mask_ratio)), 1 + patches
    width, decoder_width = margs["embed_dim"], margs["decoder_embed_dim"]

    def block(tokens: int, dim: int) -> float:
        return (8 + 4 * margs["mlp_ratio"]) * tokens * dim**2 + 4 * tokens**2 * dim

    forward = (2 * patches * patch_pixels * width
               + margs["depth"] * block(encoder_tokens, width)
               + 2 * encoder_tokens * width * decoder_width
               + margs["decoder_depth"] * block(decoder_tokens, decoder_width)
               + 2 * decoder_tokens * decoder_width * patch_pixels)
    return 3 * forward


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 peak in TFLOP/s: --peak-tflops, else the GPU's datasheet figure; None if unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def make_step(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, public: bool = False):
    """One training step on a batch, with its own AdamW; the loss is read on the host every step.

    Ours, as train.py runs it: `dtype` autocast, fused AdamW on a GPU, K given to the forward (no host
    read inside it), one host read of the loss (train.py reads it once per log window: an upper bound).
    Public-MAE-style, as its reference loop runs: fp16 autocast with
    a GradScaler on a GPU (fp32 on the CPU), AdamW's default unfused kernels, the gradients unscaled
    and their norm taken every step, the loss read with .item() and a device synchronize every step.
    """
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda and not public)
    if public:
        dtype = torch.float16 if cuda else torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=public)
    options = {} if public else {"num_visible": model.visible_count(MASK_RATIO)}

    def step(batch: dict) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            images, mask = batch["images"].to(device, non_blocking=True), batch["mask"].to(device)
            loss, _, _ = model(images, mask, **options)
        scaler.scale(loss).backward()
        if public:
            scaler.unscale_(optimizer)
            torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        if public and cuda:
            torch.cuda.synchronize(device)
        return value

    return step


def host_syncs(step, batch: dict, device: torch.device) -> int | None:
    """Host-device synchronisations in one step: the CUDA runtime's synchronize calls seen by
    torch.profiler (behind .item(), nonzero, non-pinned copies to the host and explicit synchronizes).
    None on the CPU, where the host never waits for a device."""
    if device.type != "cuda":
        return None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(batch)
    return sum(event.count for event in prof.key_averages() if event.key in SYNC_EVENTS)


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


def time_steps(step, batches: Iterator[dict], steps: int, warmup: int, device: torch.device,
               count_syncs: bool = True) -> dict:
    """Run warmup + steps training steps; images/s, peak memory and data-wait share of the timed part,
    the warm-up's seconds (torch.compile compiles then) and the host syncs of one more step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    images = waited = warmup_seconds = 0.0
    start = time.perf_counter()
    for index in range(warmup + steps):
        if index == warmup:
            sync()
            warmup_seconds = time.perf_counter() - start
            reset_peak_memory(device)
            images = waited = 0.0
            start = time.perf_counter()
        fetch = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - fetch
        step(batch)
        images += batch["images"].shape[0]
    sync()
    elapsed = time.perf_counter() - start
    return {"images_per_s": round(images / elapsed, 2), "peak_mem_mb": round(peak_memory_mb(device), 1),
            "data_wait": round(waited / elapsed, 4), "warmup_s": round(warmup_seconds, 2),
            "host_syncs_per_step": host_syncs(step, batch, device) if count_syncs else None}


def with_mfu(row: dict, margs: dict, peak: float | None) -> dict:
    """Add achieved TFLOP/s (from the stated FLOP count) and, when the peak is known, the MFU."""
    tflops = row["images_per_s"] * train_flops_per_image(margs) / 1e12
    return {**row, "gflops_per_image": round(train_flops_per_image(margs) / 1e9, 2),
            "tflops": round(tflops, 3), "mfu": round(tflops / peak, 4) if peak else None}


def largest_batch(model: torch.nn.Module, margs: dict, device: torch.device, dtype: torch.dtype,
                  start: int, limit: int) -> dict:
    """Double the batch from `start` until a step runs out of device memory or passes `limit`:
    the largest that ran, with its images/s and peak memory."""
    best, batch = None, start
    while batch <= limit:
        try:
            timed = time_steps(make_step(model, device, dtype), synthetic_batches(margs, batch, device),
                               steps=2, warmup=1, device=device, count_syncs=False)
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        best = {"batch": batch, **timed}
        batch *= 2
    if best is None:
        raise SystemExit(f"error: a step of batch {start} does not fit in {device} memory")
    limited_by = "memory" if batch <= limit else f"--max-batch {limit}"
    return {"largest_batch": best["batch"], "limited_by": limited_by,
            **{k: best[k] for k in ("images_per_s", "peak_mem_mb")}}


def corpus_root(data: Path | None, n: int) -> Path:
    """The class-folder root for loader rows: --data, else a JPEG corpus made (once) by pipelines.prepare."""
    if data is None:
        data = ROOT / "runs" / "jpeg-corpus"
        subprocess.run([sys.executable, "-m", "pipelines.prepare", "jpeg-corpus", "--out", str(data),
                        "--n", str(n)], cwd=ROOT, check=True)
    return data


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the results here (rewritten after every row)")
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
    p.add_argument("--compile", action="store_true", help="also time torch.compile of our model")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend ('eager' checks the capture only, fast on a CPU)")
    p.add_argument("--largest", action="store_true", help="find the largest batch that fits (synthetic)")
    p.add_argument("--max-batch", type=int, default=16384, help="stop the --largest search here")
    p.add_argument("--peak-tflops", type=float, help="the device's dense peak for MFU (default: datasheet)")
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
    peak = peak_tflops(device, args.peak_tflops)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "precision": args.precision, "peak_tflops": peak, "results": [], "baseline": [], "largest": []}

    def record(key: str, row: dict) -> None:
        out[key].append(row)
        print(json.dumps(row), flush=True)
        if args.json:  # after every row: a run stopped by its time box keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")

    for name in args.models:
        torch.manual_seed(0)
        model = build_mae(name).to(device)
        margs = model.model_args
        batch = args.batch or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)[name]
        folder = args.demo_data if name == "demo" and args.demo_data.is_dir() else data
        describe = {"model": name, "img_size": margs["img_size"], "batch": batch}
        public_rate = None
        for source in args.inputs:
            batches = (synthetic_batches(margs, batch, device) if source == "synthetic"
                       else loader_batches(margs, batch, device, folder, workers))
            row = {**describe, "input": source, "compile": False,
                   **time_steps(make_step(model, device, dtype), batches, args.steps, args.warmup, device)}
            record("results", with_mfu(row, margs, peak))
            if source == "synthetic" and not args.no_baseline:
                record("baseline", compare_public(model, row, args, device, dtype))
                public_rate = out["baseline"][-1]["public_style_images_per_s"]
        if args.largest:
            found = largest_batch(model, margs, device, dtype, batch, args.max_batch)
            record("largest", with_mfu({**describe, **found}, margs, peak))
        if args.compile:  # last: compilation is the slowest and least predictable part
            step = make_step(torch.compile(model, backend=args.compile_backend), device, dtype)
            timed = time_steps(step, synthetic_batches(margs, batch, device), args.steps, args.warmup, device)
            row = with_mfu({**describe, "input": "synthetic", "compile": args.compile_backend, **timed},
                           margs, peak)
            if public_rate:
                row["speedup_vs_public_style"] = round(row["images_per_s"] / public_rate, 3)
            record("results", row)


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
        timed = time_steps(make_step(net, device, dtype, public=key == "public"),
                           synthetic_batches(margs, ours["batch"], device), args.steps, args.warmup, device)
        if best[key] is None or timed["images_per_s"] > best[key]["images_per_s"]:
            best[key] = timed
    mine, theirs = best["ours"], best["public"]
    return {"model": ours["model"], "img_size": ours["img_size"], "batch": ours["batch"],
            "images_per_s": mine["images_per_s"], "public_style_images_per_s": theirs["images_per_s"],
            "speedup": round(mine["images_per_s"] / theirs["images_per_s"], 3),
            "peak_mem_mb": mine["peak_mem_mb"], "public_style_peak_mem_mb": theirs["peak_mem_mb"],
            "host_syncs_per_step": mine["host_syncs_per_step"],
            "public_style_host_syncs_per_step": theirs["host_syncs_per_step"],
            "public_style_precision": "fp16+GradScaler" if device.type == "cuda" else "fp32+GradScaler"}


if __name__ == "__main__":
    main()
