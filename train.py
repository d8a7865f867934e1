"""ColorMAE / MAE pretraining in one file: config -> loader + masks -> MAE -> AdamW -> checkpoints -> MLflow.

    python train.py --config configs/demo.yaml                       # the CPU demo (Fashion-MNIST)
    python train.py --config configs/demo.yaml train.epochs=2 mask.schedule=blue --loader torch
    torchrun --nproc-per-node 8 train.py --config configs/vit_base_green_800ep.yaml

A run lives in <log.runs_root>/<log.run_name>: checkpoint-last.pth (every epoch and on SIGTERM or
SIGUSR1), checkpoint-<epoch>.pth (every train.checkpoint_every epochs) and the figures. The same
command again (or --resume PATH) continues exactly where the run stopped.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep instead of spinning (set before torch loads): on a few shared CPU
# cores, spinning threads starve the loader workers and other processes, which costs several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import cli

if __name__ == "__main__":  # --help and --print-config answer here, before torch loads (seconds)
    cli.train_answer_early(__doc__, sys.argv[1:])

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import errors
import run_lock
import tracking
from configs import Config, ConfigError, dump_config, flatten, load_config, model_kwargs, to_dict, validate
from configs.config import TrainConfig
from configs.fingerprint import fingerprint
from model import MaskedAutoencoderViT, build_mae
from model.checkpoint import read_training_checkpoint, save_checkpoint
from model.export import model_card, write_encoder
from noise import parse_schedule
from pipelines import LoaderConfig, build_loader, scan

log = logging.getLogger("train")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops before the optimiser step."""


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Command line -> (Config, args); the config is validated separately."""
    args = cli.train_parser(__doc__).parse_intermixed_args(argv)
    return load_config(args.config, cli.train_overrides(args)), args


def init_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """torchrun's env:// rendezvous if WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU) -> (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return rank, world, device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None means fp32; `auto` is bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def rng_state(device: torch.device) -> dict:
    """This process's RNG states as tensors and plain containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def run_folder(cfg: Config) -> Path:
    """<log.runs_root>/<log.run_name, else the config file's name>."""
    return Path(cfg.log.runs_root) / (cfg.log.run_name or cfg.name)


RECONSTRUCTION_ROWS = ("original", "masked input", "reconstruction", "reconstruction + visible")


@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoderViT, images: torch.Tensor, mask: torch.Tensor | None,
                        path: Path, min_side: int = 128) -> None:
    """Save the labelled RECONSTRUCTION_ROWS, one column per image (hidden patches grey in row 2).

    Images are scaled up (nearest neighbour) to at least `min_side` pixels so 32-pixel inputs stay legible.
    """
    model.eval()
    _, pred, mask = model(images, mask)
    model.train()
    target = model.patchify(images)
    if model.norm_pix_loss:  # predictions are per-patch normalised pixels: undo with the true statistics
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1)
                 for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    original = (images.float() * std + mean).clamp(0, 1)
    predicted = (model.unpatchify(pred.float()) * std + mean).clamp(0, 1)
    hidden = model.unpatchify(mask[..., None].expand_as(target).float())
    rows = torch.stack([original, original * (1 - hidden) + 0.5 * hidden, predicted,
                        original * (1 - hidden) + predicted * hidden])
    scale = -(-min_side // images.shape[-1])
    cells = F.interpolate(rows.flatten(0, 1).cpu(), scale_factor=scale, mode="nearest")
    grid = to_pil_image(make_grid(cells, nrow=len(images), padding=2, pad_value=1.0))
    cell = images.shape[-1] * scale + 2
    font = ImageFont.load_default(size=max(12, cell // 8))
    label_width = int(max(font.getlength(label) for label in RECONSTRUCTION_ROWS)) + 12
    figure = Image.new("RGB", (label_width + grid.width, grid.height), "white")
    figure.paste(grid, (label_width, 0))
    draw = ImageDraw.Draw(figure)
    for row, label in enumerate(RECONSTRUCTION_ROWS):
        draw.text((6, row * cell + cell // 2), label, fill="black", font=font, anchor="lm")
    figure.save(path)


def build_optimizer(model: MaskedAutoencoderViT, t: TrainConfig, lr: float, *, warmup_steps: int,
                    total_steps: int, fused: bool = False) -> tuple[torch.optim.AdamW, CosineLRScheduler]:
    """AdamW and its schedule, stepped per optimiser step: linear warm-up from 0 to `lr`, then cosine.

    No weight decay on biases and norms (1-D) nor on the model's tokens and position embeddings.
    """
    groups = param_groups_weight_decay(model, t.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(t.betas), fused=fused)
    scheduler = CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=t.min_lr, warmup_t=warmup_steps,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    return optimizer, scheduler


class Trainer:
    """Owns the model, loader, optimiser, schedule, checkpoints and tracker of one run."""

    def __init__(self, cfg: Config, resume: str | None = None) -> None:
        self.cfg, t = cfg, cfg.train
        self.rank, self.world, self.device = init_distributed(t.device)
        self.run_dir = run_folder(cfg)
        for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
            seed_fn(t.seed + self.rank)

        self.model = build_mae(cfg.model.preset, **model_kwargs(cfg)).to(self.device)
        self.micro_batch = t.batch_size // (self.world * t.accum_steps)
        self.loader = build_loader(LoaderConfig.from_sections(
            cfg.data, cfg.mask, patch_size=self.model.patch_size, batch_size=self.micro_batch, seed=t.seed,
            rank=self.rank, world_size=self.world, device=str(self.device)))
        self.steps_per_epoch = min(len(self.loader) // t.accum_steps, t.steps_per_epoch or len(self.loader))
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data.path {cfg.data.path} has too few images for a step of {t.batch_size}")
        # runs with equal fingerprints differ only in seed and mask: eval.compare pools only those
        self.fingerprint = fingerprint(cfg, self.loader.data_signature,
                                       steps_per_epoch=self.steps_per_epoch)[0]

        self.optimizer, self.scheduler = build_optimizer(
            self.model, t, cfg.lr, warmup_steps=t.warmup_epochs * self.steps_per_epoch,
            total_steps=t.epochs * self.steps_per_epoch, fused=self.device.type == "cuda")
        self.dtype = autocast_dtype(t.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.sample = 0, None  # sample: a few training images for the reconstruction figure
        self.last_loss: float | None = None  # mean loss of the last logged window (the model card's)
        self.stop_signals: list[int] = []  # SIGTERM / SIGUSR1 received during fit()
        run_id = self.load(resume)
        self.run_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad input leaves no run folder
        if t.compile:
            self.model.compile()
        self.ddp = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)

        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.uri = tracking.resolve_uri(cfg.log.mlflow_uri, cfg.log.runs_root)
        checkpoint = (self.run_dir / "checkpoint-last.pth").resolve()  # recorded relative to the runs root
        self.tracker = tracking.Tracker(
            self.uri, cfg.log.experiment, run_name=self.run_dir.name, run_id=run_id,
            enabled=self.rank == 0 and cfg.log.mlflow, offline_dir=self.run_dir,
            system_metrics=cfg.log.system_metrics,
            tags={**tracking.standard_tags(str(Path(__file__).resolve()), git_commit()),
                  "loader": cfg.data.loader, "mask": cfg.mask.schedule, "world_size": self.world,
                  "device": device_name, "runs_root": str(Path(cfg.log.runs_root).resolve()),
                  "checkpoint": str(checkpoint.relative_to(Path(cfg.log.runs_root).resolve())),
                  "colormae.fingerprint": self.fingerprint,
                  "colormae.data_signature": self.loader.data_signature})

    def load(self, resume: str | None) -> str | None:
        """Restore from --resume or the run's checkpoint-last.pth; returns the MLflow run id to continue."""
        path = self.run_dir / "checkpoint-last.pth" if resume is None else Path(resume)
        path = path / "checkpoint-last.pth" if path.is_dir() else path
        if not path.is_file():
            if resume is not None:
                raise ConfigError(f"--resume {resume}: no checkpoint at {path}")
            return None
        # a broken checkpoint-last.pth on a plain rerun: continue from the newest good checkpoint-<epoch>.pth
        path, ckpt = read_training_checkpoint(path, self.model.model_args, recover=resume is None,
                                              keep=self.rank == 0)
        if len(ckpt["loader"]) != self.world:
            raise ConfigError(f"{path} was written by {len(ckpt['loader'])} processes and this run has "
                              f"{self.world}: exact resume needs the same world size")
        if ckpt["step"] // self.steps_per_epoch != ckpt["epoch"]:
            raise ConfigError(f"{path} (epoch {ckpt['epoch']}, step {ckpt['step']}) was written with "
                              f"another number of steps per epoch than this run's {self.steps_per_epoch}: "
                              "resume with the same batch size, accumulation, steps_per_epoch and data")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.loader.load_state_dict(ckpt["loader"][self.rank])
        set_rng_state(ckpt["rng"][self.rank], self.device)
        self.step = ckpt["step"]
        if self.rank == 0:
            log.info("resuming from %s at epoch %d, step %d", path, ckpt["epoch"], self.step)
        synced = self.run_dir / tracking.RUN_ID_FILE  # written by `tracking.py sync` of an offline run
        return ckpt.get("mlflow_run_id") or (synced.read_text().strip() if synced.is_file() else None)

    def save(self, epoch: int, name: str) -> None:
        """Checkpoint (rank 0 writes; every rank's loader and RNG state is gathered into it)."""
        per_rank = [(self.loader.state_dict(), rng_state(self.device))]
        if self.world > 1:
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, (self.loader.state_dict(), rng_state(self.device)))
        if self.rank == 0:
            save_checkpoint({
                "model": self.model.state_dict(), "model_args": self.model.model_args,
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "epoch": epoch, "step": self.step, "loader": [s[0] for s in per_rank],
                "rng": [s[1] for s in per_rank], "config": to_dict(self.cfg),
                "mlflow_run_id": self.tracker.run_id}, self.run_dir / name)

    def train_step(self, batches) -> tuple[float, bool, float]:
        """One optimiser step over accum_steps micro-batches -> (mean loss over ranks, stop, data wait s)."""
        t, wait, loss_sum = self.cfg.train, 0.0, torch.zeros((), device=self.device)
        self.scheduler.step_update(self.step)
        for micro in range(t.accum_steps):
            fetch = time.perf_counter()
            batch = next(batches)
            images, mask = batch["images"].to(self.device, non_blocking=True), batch["mask"]
            wait += time.perf_counter() - fetch
            if self.sample is None and self.rank == 0:
                self.sample = (images[:8].clone(), None if mask is None else mask[:8].clone())
            last = micro == t.accum_steps - 1  # DDP all-reduces the gradients on the last micro-batch only
            with self.ddp.no_sync() if self.world > 1 and not last else nullcontext(), \
                    torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = self.ddp(images, mask)[0]
            self.scaler.scale(loss / t.accum_steps).backward()
            loss_sum += loss.detach().float()
        stop_flag = torch.tensor(float(bool(self.stop_signals)), device=self.device)
        stats = torch.stack([loss_sum / t.accum_steps, stop_flag])
        if self.world > 1:  # one collective: the mean loss, and whether any rank got a stop signal
            dist.all_reduce(stats)
        loss_value, stop = stats[0].item() / self.world, stats[1].item() > 0
        if not np.isfinite(loss_value):
            raise NonFiniteLoss(f"loss is {loss_value} at step {self.step + 1}")
        if t.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_value, stop, wait

    def fit(self) -> nn.Module:
        """Train to the last epoch (or until a stop signal); returns the unwrapped model."""
        cfg, t, spe = self.cfg, self.cfg.train, self.steps_per_epoch
        start_epoch = self.step // spe
        show_bar = self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=t.epochs * spe, initial=self.step, unit="step", disable=not show_bar)
        window: list[tuple[float, float, float]] = []  # (loss, step seconds, data-wait seconds)
        status = "FAILED"  # what the MLflow run ends as, unless the loop below completes or is stopped
        # Preemption (SIGTERM, SIGUSR1): finish the current step, save, return (exit code 0).
        previous = {sig: signal.signal(sig, lambda signum, frame: self.stop_signals.append(signum))
                    for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            if self.rank == 0:
                self.tracker.log_params({**flatten(cfg), "lr": cfg.lr, "micro_batch": self.micro_batch,
                                         "world_size": self.world, "steps_per_epoch": spe})
                self.log_provenance()
                if self.step == 0:
                    self.log_mask_figure()
                log.info("%s: %d epochs x %d steps of %d images (%d per rank x %d accumulation x %d "
                         "ranks), lr %.2e, %s on %s", self.run_dir, t.epochs, spe, t.batch_size,
                         self.micro_batch, t.accum_steps, self.world, cfg.lr, self.dtype or "fp32",
                         self.device)
            for epoch in range(start_epoch, t.epochs):
                self.loader.set_epoch(epoch)  # keeps a pending mid-epoch resume point of this epoch
                batches = iter(self.loader)
                while self.step < (epoch + 1) * spe:
                    start = time.perf_counter()
                    loss, stop, wait = self.train_step(batches)
                    window.append((loss, time.perf_counter() - start, wait))
                    img_s = t.batch_size / window[-1][1]
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{img_s:.0f}", refresh=False)
                    bar.update()
                    if self.rank == 0 and (self.step % cfg.log.every_steps == 0 or stop):
                        self.log_metrics(window, show_bar)
                        window = []
                    if stop:
                        if self.step == (epoch + 1) * spe:
                            self.end_epoch(epoch + 1, show_bar)
                        else:
                            self.save(epoch, "checkpoint-last.pth")
                        status = "KILLED"
                        log.info("stop signal: saved %s at step %d; run the same command to resume",
                                 self.run_dir / "checkpoint-last.pth", self.step)
                        return self.model
                if self.rank == 0 and window:  # the epoch's last partial window is not lost
                    self.log_metrics(window, show_bar)
                    window = []
                self.end_epoch(epoch + 1, show_bar)
            status = "FINISHED"
        except NonFiniteLoss as err:
            last = self.run_dir / "checkpoint-last.pth"
            kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint yet"
            raise SystemExit(f"error: {err}: stopped before the optimiser step; {kept}. Try a lower "
                             "train.base_lr, train.clip_grad=1.0 or train.precision=fp32, then resume."
                             ) from err
        finally:
            bar.close()
            if self.rank == 0 and window:  # steps since the last log, e.g. before a failure
                self.log_metrics(window, show_bar)
            self.tracker.close(status)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.rank == 0:
            print(f"\nDone. Checkpoints: {self.run_dir.resolve()}", flush=True)
            if cfg.log.mlflow:
                print(f"MLflow store: {self.uri}\nOpen it with:  {tracking.ui_command(self.uri)}", flush=True)
        return self.model

    def end_epoch(self, epochs_done: int, show_bar: bool) -> None:
        """Checkpoints and the reconstruction figure after an epoch."""
        t, log_cfg = self.cfg.train, self.cfg.log
        last_epoch = epochs_done == t.epochs
        self.save(epochs_done, "checkpoint-last.pth")
        if epochs_done % t.checkpoint_every == 0 or last_epoch:
            self.save(epochs_done, f"checkpoint-{epochs_done}.pth")
        if self.rank != 0:
            return
        if log_cfg.recon_every and self.sample and (epochs_done % log_cfg.recon_every == 0 or last_epoch):
            figure = self.run_dir / f"reconstruction-epoch-{epochs_done:04d}.png"
            reconstruction_grid(self.model, *self.sample, figure)
            self.tracker.log_artifact(figure, "reconstructions")
        if last_epoch or (log_cfg.weights_every and epochs_done % log_cfg.weights_every == 0):
            self.log_encoder(epochs_done, register=last_epoch)
        if not show_bar:
            log.info("epoch %d/%d done, checkpoints in %s", epochs_done, t.epochs, self.run_dir)

    def log_metrics(self, window: list[tuple[float, float, float]], show_bar: bool) -> None:
        """Average the steps since the last call and log them to MLflow (and the console without a bar)."""
        losses, times, waits = (np.array(column) for column in zip(*window, strict=True))
        if self.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics = {"loss": losses.mean(), "lr": self.optimizer.param_groups[0]["lr"],
                   "images_per_s": self.cfg.train.batch_size * len(times) / times.sum(),
                   "data_wait": waits.sum() / times.sum(), "step_time_s": times.mean(),
                   "peak_mem_mb": peak_mb, "epoch": self.step / self.steps_per_epoch}
        self.tracker.log_metrics(metrics, self.step)
        self.last_loss = float(metrics["loss"])
        if not show_bar:
            log.info("step %d (epoch %.2f): loss %.4f, lr %.2e, %.0f img/s, data wait %.1f%%", self.step,
                     metrics["epoch"], metrics["loss"], metrics["lr"], metrics["images_per_s"],
                     100 * metrics["data_wait"])

    def log_provenance(self) -> None:
        """The resolved config (reruns with --config), the environment and the training dataset."""
        if not self.tracker.enabled:
            return
        self.tracker.log_text(dump_config(self.cfg), "config.yaml")
        env = tracking.environment()
        self.tracker.log_text("\n".join(env.pop("pip_freeze")) + "\n", "environment/pip-freeze.txt")
        self.tracker.log_text(json.dumps(env, indent=2) + "\n", "environment/environment.json")
        if self.loader.data_signature:  # the loader's own scan of the folder (none for a bare .beton)
            data = Path(self.cfg.data.path)
            self.tracker.log_dataset(data.name, str(data.resolve()), self.loader.data_signature,
                                     self.loader.num_images)

    def log_encoder(self, epochs_done: int, register: bool) -> None:
        """The encoder (safetensors + card) as an MLflow logged model; registered at the end if asked."""
        if not self.tracker.enabled:
            return
        card = model_card(self.model.model_args, config=to_dict(self.cfg), epoch=epochs_done, step=self.step,
                          final_loss=self.last_loss, run_id=self.tracker.run_id, fingerprint=self.fingerprint)
        with tempfile.TemporaryDirectory() as tmp:
            write_encoder(tmp, self.model.state_dict(), card)
            self.tracker.log_model_folder(tmp, "encoder", step=self.step, tags={"epoch": epochs_done},
                                          register_as=self.cfg.log.register_model if register else None)

    def log_mask_figure(self) -> None:
        """The noise.show figure (an artifact) and the noise.stats statistics (metrics at step 0) of
        the run's mask colours, in MLflow."""
        from noise.show import render
        from noise.stats import colour_statistics

        figure = self.run_dir / "masks.png"
        colours = sorted({colour for _, colour in parse_schedule(self.cfg.mask.schedule)})
        grid = self.cfg.data.img_size // self.model.patch_size
        render(figure, colours, grid=grid, ratio=self.cfg.mask.ratio, bank_path=self.cfg.mask.bank)
        self.tracker.log_artifact(figure, "figures")
        statistics = colour_statistics(colours, grid, self.cfg.mask.ratio, bank_path=self.cfg.mask.bank)
        metrics = {f"mask_stats/{colour}/{name}": value
                   for colour, values in statistics.items() for name, value in values.items()}
        self.tracker.log_metrics(metrics, 0)


def git_commit() -> str:
    """The commit this code runs at, for the run's tags (GIT_COMMIT wins: images carry no .git)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True)
    except OSError:  # no git on this machine
        return "unknown"
    return out.stdout.strip() or "unknown"


def dry_run(cfg: Config) -> nn.Module:
    """--dry-run: scan the data and build the model (no run folder, no MLflow run, no step)."""
    model = build_mae(cfg.model.preset, **model_kwargs(cfg))
    if cfg.data.beton:
        data = f"{cfg.data.beton} (ffcv)"
    else:
        manifest = scan(cfg.data.path, workers=cfg.data.workers or None)
        data = f"{len(manifest)} images in {len(manifest.classes)} classes ({manifest.num_skipped} skipped)"
    print(f"dry run: config valid; data {data}; model {cfg.model.preset} with "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; nothing trained")
    return model


def main(argv: list[str] | None = None) -> nn.Module:
    """Parse, validate before any compute, lock the run folder, train.

    An expected failure (bad config, data or checkpoint, run folder in use, disk full) exits with
    one line (errors.reported); --debug or COLORMAE_DEBUG=1 shows the traceback instead.
    """
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        with errors.reported(errors.debug_requested(argv)):
            cfg, args = parse_args(argv)
            validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))
            if args.dry_run:
                return dry_run(cfg)
            with run_lock.hold(run_folder(cfg)) if rank == 0 else nullcontext(), logging_redirect_tqdm():
                return Trainer(cfg, args.resume).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
