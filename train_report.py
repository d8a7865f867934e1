"""A training run's parts (`Run`, what train.build returns) and what it logs, and when: every
logging decision of train.py's loop in one place.

`Report` takes them on rank 0 (the other ranks log nothing): the run's params and provenance, the
metrics of each window of log.every_steps steps (and of the epoch's or run's last steps), the progress
bar on a terminal or else console lines, the mask and reconstruction figures, the encoder exports, and
summary.json in the run folder. On every rank it reads each window's losses on the host in one transfer
and stops the run at a non-finite one (`NonFiniteLoss`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn import functional as F
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm

import cuda_check
import tracking
from configs import Config, dump_config, flatten, to_dict
from model import MaskedAutoencoderViT
from model.export import model_card, save_mlflow_model, write_encoder
from pipelines import Loader

log = logging.getLogger("train")
SUMMARY_FILE = "summary.json"  # the run's end-to-end figures (Report.write_summary)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stops before its next checkpoint."""


@dataclass
class Run:
    """One training run's parts, as `build` returns them; `step` counts the optimiser steps done."""

    cfg: Config
    folder: Path  # run_folder.path(cfg)
    rank: int
    world: int
    device: torch.device
    model: MaskedAutoencoderViT
    ddp: nn.Module  # what the step calls: the model, inside DDP with several ranks
    loader: Loader
    micro_batch: int  # images per rank and micro-batch
    steps_per_epoch: int
    fingerprint: str  # equal for runs that differ only in seed and mask: eval.compare pools those
    optimizer: torch.optim.AdamW
    scheduler: CosineLRScheduler
    scaler: torch.amp.GradScaler  # active for fp16 only
    dtype: torch.dtype | None  # autocast's; None is fp32
    tracker: tracking.Tracker | None  # the MLflow run (the checkpoint's if it continues); None: no Report
    step: int = 0
    accum_steps: int = 1  # micro-batches per step: train.accum_steps or run_folder.split_batch's


class Report:
    """The logging of one run (see the module's docstring); `on` on rank 0 only."""

    def __init__(self, run: Run) -> None:
        self.run, self.on = run, run.rank == 0
        self.bar = tqdm(total=run.cfg.train.epochs * run.steps_per_epoch, initial=run.step, unit="step",
                        disable=not (self.on and sys.stderr.isatty()))
        self.window: list[dict[str, float]] = []  # the metrics of the steps since the last flush
        self.window_start = 0.0  # perf_counter() when the window's first step started
        self.last_loss: float | None = None  # mean loss of the last flushed window: the model card's
        self.rates: list[tuple[float, float]] = []  # (images/s, data-wait share) of each flushed window
        self.sample: tuple | None = None  # (images, mask) shown by every reconstruction figure

    def start(self) -> None:
        """The run's params and provenance; the mask figure of a fresh run; a one-line summary."""
        run, cfg, t, tracker = self.run, self.run.cfg, self.run.cfg.train, self.run.tracker
        if not self.on:
            return
        tracker.log_params({**run_params(run), "lr": cfg.lr, "micro_batch": run.micro_batch,
                            "world_size": run.world, "steps_per_epoch": run.steps_per_epoch})
        tracker.log_metrics({"world_size": run.world}, run.step)  # from this step on: elastic resumes show
        if tracker.enabled:
            tracker.log_text(dump_config(cfg), "config.yaml")  # reruns with --config
            env = tracking.environment()
            tracker.log_text("\n".join(env.pop("pip_freeze")) + "\n", "environment/pip-freeze.txt")
            tracker.log_text(json.dumps(env, indent=2) + "\n", "environment/environment.json")
            if run.loader.data_signature:  # the loader's own scan of the folder (none for a bare .beton)
                data = Path(cfg.data.path).resolve()  # named by what it is: fashion-mnist/train
                tracker.log_dataset(f"{data.parent.name}/{data.name}", relative_to_runs(data, cfg),
                                    run.loader.data_signature, run.loader.num_images)
        if run.step == 0:
            self.log_mask_figure()
        log.info("%s: %d epochs x %d steps of %d images (%d per rank x %d accumulation x %d ranks), lr %.2e, "
                 "%s on %s", run.folder, t.epochs, run.steps_per_epoch, t.batch_size, run.micro_batch,
                 run.accum_steps, run.world, cfg.lr, run.dtype or "fp32",
                 cuda_check.device_summary(t.device, run.device))

    def keep_sample(self, batches: Iterator[dict]) -> Iterator[dict]:
        """`batches`, unchanged; the first 8 images of this process's first batch are kept for the
        reconstruction figures."""
        for batch in batches:
            if self.sample is None and self.on:
                images, mask = batch["images"][:8].to(self.run.device), batch["mask"]
                self.sample = (images.clone(), None if mask is None else mask[:8].clone())
            yield batch

    def step(self, metrics: dict, epoch: int) -> None:
        """After each optimiser step, on every rank: `metrics` joins the window (its loss stays on the
        device); the progress bar moves; every log.every_steps steps the window is flushed."""
        if not self.window:  # the window's clock starts with its first step
            self.window_start = time.perf_counter() - metrics["step_s"]
        self.window.append(metrics)
        if self.on:
            images_per_s = self.run.cfg.train.batch_size / metrics["step_s"]
            self.bar.set_postfix(epoch=epoch, loss=f"{self.last_loss:.4f}" if self.last_loss else "-",
                                 img_s=f"{images_per_s:.0f}", refresh=False)
            self.bar.update()
        if self.run.step % self.run.cfg.log.every_steps == 0:
            self.flush()

    def end_epoch(self, epochs_done: int) -> None:
        """After an epoch's checkpoints: its last metrics; the reconstruction figure and the encoder
        export when due, and always after the last epoch."""
        run, log_cfg, last_epoch = self.run, self.run.cfg.log, epochs_done == self.run.cfg.train.epochs
        if not self.on:
            return
        self.flush()  # the epoch's last partial window is not lost
        if log_cfg.recon_every and self.sample and (epochs_done % log_cfg.recon_every == 0 or last_epoch):
            figure = run.folder / f"reconstruction-epoch-{epochs_done:04d}.png"
            reconstruction_grid(run.model, *self.sample, figure)
            run.tracker.log_artifact(figure, "reconstructions")
        if run.tracker.enabled and (last_epoch or (log_cfg.weights_every
                                                   and epochs_done % log_cfg.weights_every == 0)):
            card = model_card(run.model.model_args, config=to_dict(run.cfg), epoch=epochs_done,
                              step=run.step, final_loss=self.last_loss, run_id=run.tracker.run_id,
                              fingerprint=run.fingerprint)
            params = {"architecture": card["name"], "preset": card["preset"], "epochs": epochs_done,
                      "steps": run.step, "final_loss": self.last_loss, "mask.schedule": run.cfg.mask.schedule,
                      "mask.ratio": run.cfg.mask.ratio}
            with tempfile.TemporaryDirectory() as tmp:
                encoder = write_encoder(Path(tmp) / "encoder", run.model.state_dict(), card)
                run.tracker.log_model_folder(
                    save_mlflow_model(encoder, Path(tmp) / "model"), "encoder", step=run.step,
                    tags={"epoch": epochs_done}, register_as=log_cfg.register_model if last_epoch else None,
                    params=params, description=model_description(card), model_type="encoder")
        if self.bar.disable:
            log.info("epoch %d/%d done, checkpoints in %s", epochs_done, run.cfg.train.epochs, run.folder)

    def flush(self) -> None:
        """Read the window's losses on the host in one transfer (the step loop's one sync) and stop at
        a non-finite one, naming its step (every rank, before any checkpoint of those steps). On rank 0,
        log the window's means to MLflow (and to the console without a bar) and rewrite the run's
        summary.json. Empties the window."""
        run, window, self.window = self.run, self.window, []
        if not window:
            return
        losses = torch.stack([m["loss"] for m in window]).tolist()
        seconds = time.perf_counter() - self.window_start  # the device's queue included: it just drained
        for step, loss in enumerate(losses, run.step - len(window) + 1):
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is {loss} at step {step}")
        if not self.on:
            return
        if run.device.type == "cuda":
            peak_mb = torch.cuda.max_memory_allocated(run.device) / 2**20
        else:
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        metrics = {"loss": statistics.fmean(losses), "lr": run.optimizer.param_groups[0]["lr"],
                   "images_per_s": run.cfg.train.batch_size * len(window) / seconds,
                   "data_wait": sum(m["data_wait_s"] for m in window) / seconds,
                   "step_time_s": seconds / len(window), "peak_mem_mb": peak_mb,
                   "epoch": run.step / run.steps_per_epoch}
        run.tracker.log_metrics(metrics, run.step)
        self.last_loss = metrics["loss"]
        self.write_summary(metrics)
        if self.bar.disable:
            log.info("step %d (epoch %.2f): loss %.4f, lr %.2e, %.0f img/s, data wait %.1f%%", run.step,
                     metrics["epoch"], metrics["loss"], metrics["lr"], metrics["images_per_s"],
                     100 * metrics["data_wait"])

    def write_summary(self, metrics: dict[str, float]) -> None:
        """run.folder/summary.json: steps, last loss, and the median images/s and mean data-wait share of
        the windows after the first (start-up: compilation, the loader's first batches). bench.gpu_check
        reads it; rewritten after each window, so a run cut short still leaves its figures."""
        self.rates.append((metrics["images_per_s"], metrics["data_wait"]))
        steady = self.rates[1:] or self.rates
        summary = {"steps": self.run.step, "loss": metrics["loss"], "windows": len(self.rates),
                   "images_per_s": statistics.median(rate for rate, _ in steady),
                   "data_wait": statistics.fmean(wait for _, wait in steady),
                   "peak_mem_mb": metrics["peak_mem_mb"]}
        path = self.run.folder / SUMMARY_FILE
        path.with_suffix(".tmp").write_text(json.dumps(summary, indent=1) + "\n")
        path.with_suffix(".tmp").replace(path)

    def close(self, status: str) -> None:
        """End the bar and, after the steps not logged yet, the MLflow run (FINISHED, KILLED or FAILED)."""
        run, uri = self.run, self.run.tracker.uri
        self.bar.close()
        if self.on:  # the steps since the last flush: only after a failure (the loop flushes before saving)
            with contextlib.suppress(NonFiniteLoss):  # the run failed already; its own error tells why
                self.flush()
        run.tracker.close(status)
        if self.on and status == "KILLED":
            log.info("stop signal: saved %s at step %d; run the same command to resume",
                     run.folder / "checkpoint-last.pth", run.step)
        if self.on and status == "FINISHED":
            print(f"\nDone. Checkpoints: {run.folder.resolve()}", flush=True)
            if run.cfg.log.mlflow:
                print(f"MLflow store: {uri}\nOpen it with:  {tracking.ui_command(uri)}\nRuns table:    "
                      f"{tracking.ui_url(uri, run.tracker.experiment_id)}", flush=True)

    def log_mask_figure(self) -> None:
        """The noise.show figure and the noise.stats statistics of the run's mask colours: one table
        (mask_stats.json, shown as a table on the run page) and the same values as params."""
        from noise.show import render
        from noise.stats import colour_statistics

        run, mask = self.run, self.run.cfg.mask
        figure = run.folder / "masks.png"
        colours = sorted({colour for _, colour in run.loader.masks.generator.schedule})  # parsed there
        grid = run.cfg.data.img_size // run.model.patch_size
        render(figure, colours, grid=grid, ratio=mask.ratio, bank_path=mask.bank)
        run.tracker.log_artifact(figure, "figures")
        statistics = colour_statistics(colours, grid, mask.ratio, bank_path=mask.bank)
        names = sorted({name for values in statistics.values() for name in values})
        rows = [[colour, *(float(values[name]) for name in names)] for colour, values in statistics.items()]
        run.tracker.log_table(["colour", *names], rows, "mask_stats.json")
        run.tracker.log_params({f"mask_stats.{colour}.{name}": round(float(value), 4)
                                for colour, values in statistics.items() for name, value in values.items()})


PRECISIONS = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # by autocast dtype
PATH_PARAMS = ("data.path", "data.ffcv_path", "mask.bank")  # logged relative to the runs root


def relative_to_runs(path: str | Path, cfg: Config) -> str:
    """`path` relative to the runs root (the store's folder): no local absolute path on the run page."""
    return os.path.relpath(Path(path).resolve(), Path(cfg.log.runs_root).resolve())


def run_params(run: Run) -> dict:
    """The resolved config as params, with what `auto` and defaults became (precision, device, run
    name); paths relative to the runs root, and the store's own location left out."""
    params = flatten(run.cfg)
    for key in PATH_PARAMS:
        if params.get(key):
            params[key] = relative_to_runs(params[key], run.cfg)
    del params["log.runs_root"]
    if str(params.get("log.mlflow_uri")).startswith("sqlite:"):
        del params["log.mlflow_uri"]
    return {**params, "log.run_name": run.folder.name, "resolved.precision": PRECISIONS[run.dtype],
            "resolved.device": str(run.device)}


def model_description(card: dict) -> str:
    """The logged encoder's description on its MLflow page."""
    return (f"ColorMAE encoder {card['name']} ({card['preset']} preset: {card['image_size']} px images, "
            f"patches of {card['patch_size']}), pretrained {card['epochs']} epochs ({card['steps']} steps) "
            f"with {card['mask_schedule']} masks at ratio {card['mask_ratio']}; "
            f"final loss {card['final_loss']}. "
            "mlflow.pyfunc.load_model(...).predict maps float32 (N, 3, S, S) images normalised with the "
            "metadata's mean and std to (N, D) cls features; artifacts/encoder is a timm folder "
            "(timm.create_model('local-dir:...', pretrained=True)).")


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
