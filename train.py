"""ColorMAE / MAE pretraining: config -> loader + masks -> MAE -> AdamW -> checkpoints -> MLflow.

    python train.py --config configs/demo.yaml                       # the CPU demo (Fashion-MNIST)
    python train.py --config configs/demo.yaml train.epochs=2 mask.schedule=random --loader torch
    torchrun --nproc-per-node 8 train.py --config configs/vit_base_green_800ep.yaml

A run lives in <log.runs_root>/<log.run_name>: checkpoint-last.pth (every epoch and on SIGTERM or
SIGUSR1), checkpoint-<epoch>.pth (every train.checkpoint_every epochs; 0: no checkpoint files), the
figures and summary.json. The same command again (or --resume PATH) continues exactly where the run
stopped; a changed setting or changed data does not (run_folder.py: a run folder holds one experiment).

Read from `main` up: `build(cfg)` makes the parts of a run (a `Run`), `train(run)` is the epoch / step
loop and `train_step` one optimiser step; what is logged, and when, is train_report.py's `Report`.
"""

from __future__ import annotations

import os

# Waiting OpenMP threads sleep instead of spinning (set before torch loads): on a few shared CPU
# cores, spinning threads starve the loader workers and other processes, which costs several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import cli
import errors
from configs import Config, ConfigError, dump_config, load_config, model_kwargs, to_dict, validate
from pipelines.backends import LOADERS


def build_parser() -> argparse.ArgumentParser:
    """The command line of train.py."""
    parser = cli.make_parser("train.py", __doc__)
    parser.add_argument("--config", help="YAML file in configs/ (default: the built-in paper recipe)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides such as train.epochs=2 mask.schedule=blue (default: none)")
    parser.add_argument("--loader", choices=LOADERS, help="data loader (default: the config's data.loader)")
    parser.add_argument("--resume",
                        help="checkpoint or run folder (default: the run's checkpoint-last.pth, if any)")
    parser.add_argument("--continue-with", metavar="KEYS", type=lambda text: text.split(","), action="extend",
                        default=[], help="continue the run although these config keys differ from its "
                        "checkpoint (comma-separated, e.g. mask.schedule for a new schedule from the next "
                        "epoch, or data.signature for changed data); other changes than more epochs, "
                        "logging and the loader are refused (default: none)")
    cli.add_common_args(parser, uri_default="log.mlflow_uri, else MLFLOW_TRACKING_URI, else SQLite in the "
                        "runs root", experiment_default="the config's log.experiment", device_default=None,
                        seed_default=None)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the config, scan the data and build the model, then exit "
                             "without training (default: off)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an expected failure, like COLORMAE_DEBUG=1 "
                             "(default: off)")
    return parser


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The positional key=value overrides, then those the flags stand for."""
    flags = {"loader": "data.loader", "mlflow_uri": "log.mlflow_uri", "experiment": "log.experiment",
             "device": "train.device", "seed": "train.seed"}
    return [*args.overrides, *(f"{key}={getattr(args, flag)}" for flag, key in flags.items()
                               if getattr(args, flag) is not None)]


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Command line -> (Config, args); the config is validated separately."""
    args = build_parser().parse_intermixed_args(argv)
    return load_config(args.config, config_overrides(args)), args


if __name__ == "__main__":  # --help, usage errors and --print-config answer here, before torch loads
    early = build_parser().parse_intermixed_args()
    if early.print_config:
        with errors.reported(early.debug):
            print(dump_config(load_config(early.config, config_overrides(early))), end="")
        raise SystemExit(0)

import numpy as np
import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.contrib.logging import logging_redirect_tqdm

import cuda_check
import run_folder
import tracking
from configs.config import TrainConfig
from configs.fingerprint import fingerprint
from model import MaskedAutoencoderViT, build_mae
from pipelines import Loader, LoaderConfig, build_loader, scan
from train_report import NonFiniteLoss, Report, Run, reconstruction_grid  # noqa: F401 (stay public here)

log = logging.getLogger("train")



def init_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """torchrun's env:// rendezvous if WORLD_SIZE > 1 (NCCL on GPU, gloo on CPU) -> (rank, world, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda_check.check_driver(torch.version.cuda)  # a driver too old for the wheels hides every GPU
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


def build_optimizer(model: MaskedAutoencoderViT, t: TrainConfig, lr: float, *, warmup_steps: int,
                    total_steps: int, fused: bool = False) -> tuple[torch.optim.AdamW, CosineLRScheduler]:
    """AdamW and its schedule, stepped per optimiser step: linear warm-up from 0 to `lr`, then cosine.

    No weight decay on biases and norms (1-D) nor on the model's tokens and position embeddings.
    """
    groups = param_groups_weight_decay(model, t.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(t.betas), fused=fused)
    return optimizer, build_scheduler(optimizer, t, warmup_steps=warmup_steps, total_steps=total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, *, warmup_steps: int,
                    total_steps: int) -> CosineLRScheduler:
    """Per optimiser step (`step_update(step)`): linear warm-up from 0 to the lr, then cosine to min_lr."""
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total_steps - warmup_steps), lr_min=t.min_lr, warmup_t=warmup_steps,
        warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def build(cfg: Config, start: run_folder.Start | None = None, accept: tuple[str, ...] = ()) -> Run:
    """Everything a run needs, restored from `start` (see run_folder.resume_point) if given; bad input,
    changed data included, raises before the run folder or the MLflow run exists."""
    t = cfg.train
    rank, world, device = init_distributed(t.device)
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(t.seed + rank)
    model = build_mae(cfg.model.preset, **model_kwargs(cfg)).to(device)
    micro_batch, accum_steps = run_folder.split_batch(t, world, start.ckpt if start else None)
    loader = build_loader(LoaderConfig.from_sections(
        cfg.data, cfg.mask, patch_size=model.patch_size, batch_size=micro_batch, seed=t.seed,
        rank=rank, world_size=world, device=str(device)))
    steps_per_epoch = min(len(loader) // accum_steps, t.steps_per_epoch or len(loader))
    if steps_per_epoch < 1:
        raise ConfigError(f"data.path {cfg.data.path} has too few images for a step of {t.batch_size}")
    optimizer, scheduler = build_optimizer(
        model, t, cfg.lr, warmup_steps=t.warmup_epochs * steps_per_epoch,
        total_steps=t.epochs * steps_per_epoch, fused=device.type == "cuda")
    dtype = autocast_dtype(t.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    folder = run_folder.path(cfg)
    step, mlflow_run_id = 0, None
    if start is not None:
        run_folder.check_data(start, loader.manifest, loader.data_signature, accept)
        run_folder.check_resumable(start.path, start.ckpt, model.model_args, steps_per_epoch=steps_per_epoch)
        step = restore(start.ckpt, model=model, optimizer=optimizer, scaler=scaler, loader=loader, rank=rank,
                       world=world, device=device)
        if rank == 0:
            changed = f"; changed: {start.describe()}" if start.changes else ""
            log.info("resuming from %s at epoch %d, step %d%s", start.path, start.ckpt["epoch"], step,
                     changed)
            before, micro = len(start.ckpt["loader"]), run_folder.checkpoint_micro_batch(start.ckpt)
            if before != world:
                log.info("elastic resume: written by %d processes (%d images x %d accumulation each), now "
                         "%d (%d x %d); the global batch of %d is kept and the epoch goes on at its "
                         "position", before, micro, t.batch_size // (before * micro), world, micro_batch,
                         accum_steps, t.batch_size)
        mlflow_run_id = start.ckpt.get("mlflow_run_id") or run_folder.read_run_id(folder)  # a sync's id
    runs_root = Path(cfg.log.runs_root).resolve()
    fingerprint_ = fingerprint(cfg, loader.data_signature, steps_per_epoch=steps_per_epoch)[0]
    changes = {f"colormae.changes.step{step}": start.describe()} if start and start.changes else {}
    tracker = tracking.Tracker(
        tracking.resolve_uri(cfg.log.mlflow_uri, cfg.log.runs_root), cfg.log.experiment,
        run_name=folder.name, run_id=mlflow_run_id, enabled=rank == 0 and cfg.log.mlflow,
        offline_dir=folder, system_metrics=cfg.log.system_metrics,
        tags={**tracking.standard_tags(Path(__file__).name),  # a name, not this machine's path
              "loader": cfg.data.loader, "mask": cfg.mask.schedule, "world_size": world,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              # relative to the runs root, the store's folder: runs/ may move
              "checkpoint": str((folder / "checkpoint-last.pth").resolve().relative_to(runs_root)),
              "colormae.fingerprint": fingerprint_, "colormae.data_signature": loader.data_signature,
              **changes})
    folder.mkdir(parents=True, exist_ok=True)  # only now: a bad input or refused credentials leave none
    if rank == 0:
        run_folder.write_data_files(folder, loader.manifest)
    if t.compile:
        model.compile()
    ddp = model if world == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    return Run(cfg=cfg, folder=folder, rank=rank, world=world, device=device, model=model, ddp=ddp,
               loader=loader, micro_batch=micro_batch, steps_per_epoch=steps_per_epoch,
               fingerprint=fingerprint_, optimizer=optimizer, scheduler=scheduler, scaler=scaler, dtype=dtype,
               tracker=tracker, step=step, accum_steps=accum_steps)


def restore(ckpt: dict, *, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            loader: Loader, rank: int, world: int, device: torch.device) -> int:
    """Load a checkpoint's states into the parts of this rank, also when it was written by another number
    of processes (the epoch goes on at its sample position); returns the optimiser steps done."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    loader.load_state_dict(run_folder.loader_state(ckpt, rank, world))
    if rank < len(ckpt["rng"]):  # a process added by an elastic restart keeps its fresh seeds
        set_rng_state(ckpt["rng"][rank], device)
    return ckpt["step"]


def save(run: Run, name: str) -> None:
    """Checkpoint run.folder/name: rank 0 writes it, with every rank's loader and RNG state."""
    per_rank = [(run.loader.state_dict(), rng_state(run.device))]
    if run.world > 1:
        per_rank = [None] * run.world
        dist.all_gather_object(per_rank, (run.loader.state_dict(), rng_state(run.device)))
    if run.rank == 0:
        run_folder.save_checkpoint({
            "model": run.model.state_dict(), "model_args": run.model.model_args,
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "epoch": run.step // run.steps_per_epoch, "step": run.step, "loader": [s[0] for s in per_rank],
            "rng": [s[1] for s in per_rank], "config": to_dict(run.cfg),
            "data_signature": run.loader.data_signature, "mlflow_run_id": run.tracker.run_id,
            "micro_batch": run.micro_batch},
            run.folder / name)


def train_step(run: Run, batches: Iterator[dict]) -> dict:
    """One optimiser step over run.accum_steps micro-batches -> its metrics: the loss (mean over the
    micro-batches and ranks, a tensor left on the device: `Report.flush` reads a window of them at
    once and stops at a non-finite one), its seconds and those spent waiting for data. Nothing here
    waits for the device (fp16's GradScaler and several ranks' stop check aside)."""
    t, start, wait = run.cfg.train, time.perf_counter(), 0.0
    num_visible = run.model.visible_count(run.cfg.mask.ratio)  # K, static: no host read in the forward
    loss_sum = torch.zeros((), device=run.device)
    run.scheduler.step_update(run.step)
    for micro in range(run.accum_steps):
        fetch = time.perf_counter()
        batch = next(batches)
        images, mask = batch["images"].to(run.device, non_blocking=True), batch["mask"]
        wait += time.perf_counter() - fetch
        last = micro == run.accum_steps - 1  # DDP all-reduces the gradients on the last micro-batch only
        with run.ddp.no_sync() if run.world > 1 and not last else nullcontext(), \
                torch.autocast(run.device.type, dtype=run.dtype, enabled=run.dtype is not None):
            loss = run.ddp(images, mask, mask_ratio=run.cfg.mask.ratio, num_visible=num_visible)[0]
        run.scaler.scale(loss / run.accum_steps).backward()
        loss_sum += loss.detach().float()
    mean_loss = loss_sum / (run.accum_steps * run.world)
    if run.world > 1:
        dist.all_reduce(mean_loss)
    if t.clip_grad:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), t.clip_grad)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return {"loss": mean_loss, "step_s": time.perf_counter() - start, "data_wait_s": wait}


@contextmanager
def stop_signals(run: Run) -> Iterator[Callable[[], bool]]:
    """Inside the block, SIGTERM and SIGUSR1 (a scheduler's notice before preemption) only note a stop;
    the loop asks the yielded function after each step, then saves and returns (exit code 0). Every
    rank gets the same answer (true once any rank was signalled), so all stop after the same step."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def requested() -> bool:
        if run.world == 1:
            return bool(received)
        anyone = torch.tensor(float(bool(received)), device=run.device)
        dist.all_reduce(anyone)  # one more tiny collective per step, so the step's own carries metrics only
        return anyone.item() > 0

    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(run: Run) -> MaskedAutoencoderViT:
    """The loop: epochs of optimiser steps with checkpoints after each, until train.epochs or a stop
    signal (then checkpoint-last.pth holds the exact point to resume from); returns the model."""
    t, spe = run.cfg.train, run.steps_per_epoch
    report, status, stopped = Report(run), "FAILED", False  # FAILED unless the loop ends or is stopped
    with stop_signals(run) as stop_requested:  # also while the report closes: a late signal is noted only
        try:
            report.start()
            for epoch in range(run.step // spe, t.epochs):
                run.loader.set_epoch(epoch)  # keeps a pending mid-epoch resume point of this epoch
                batches = report.keep_sample(iter(run.loader))
                epoch_end = (epoch + 1) * spe
                while run.step < epoch_end and not stopped:
                    report.step(train_step(run, batches), epoch)
                    stopped = stop_requested()
                report.flush()  # a non-finite loss since the last window stops the run before the save
                if t.checkpoint_every:  # 0: no checkpoint files (benchmarks)
                    save(run, "checkpoint-last.pth")  # after a stop mid-epoch, the resume continues inside it
                    due = (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs
                    if run.step == epoch_end and due:
                        save(run, f"checkpoint-{epoch + 1}.pth")
                if run.step == epoch_end:
                    report.end_epoch(epoch + 1)
                if stopped:
                    break
            status = "KILLED" if stopped else "FINISHED"
        finally:
            report.close(status)
    return run.model


def dry_run(cfg: Config) -> nn.Module:
    """--dry-run: scan the data and build the model (no run folder, no MLflow run, no step)."""
    model = build_mae(cfg.model.preset, **model_kwargs(cfg))
    if cfg.data.beton:
        data = f"{cfg.data.beton} (ffcv)"
    else:
        manifest = scan(cfg.data.path, workers=cfg.data.workers or None, max_pixels=cfg.data.max_pixels)
        data = f"{len(manifest)} images in {len(manifest.classes)} classes ({manifest.num_skipped} skipped)"
    print(f"dry run: config valid; data {data}; model {cfg.model.preset} with "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; nothing trained")
    return model


def main(argv: list[str] | None = None) -> nn.Module | None:
    """Parse, validate before any compute, lock the run folder, check what it holds, train (None:
    the run folder's run is finished already).

    An expected failure (bad config, data or checkpoint, run folder in use, disk full) exits with
    one line (errors.reported); --debug or COLORMAE_DEBUG=1 shows the traceback instead.
    """
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        with errors.reported(errors.debug_requested(argv)):
            cfg, args = parse_args(argv)
            world = int(os.environ.get("WORLD_SIZE", 1))
            validate(cfg, world_size=world)
            if cfg.train.device == "cuda" and not torch.cuda.is_available():  # before the lock and compute
                cuda_check.check_driver(torch.version.cuda)  # a driver too old for the wheels says so
                why = cuda_check.cpu_fallback_reason(torch.version.cuda)
                raise ConfigError(f"train.device cuda (--device cuda): torch finds no CUDA device ({why}); "
                                  "use --device cpu, or auto to train on a GPU when there is one")
            if args.dry_run:
                return dry_run(cfg)
            lock = run_folder.hold(run_folder.path(cfg)) if rank == 0 else nullcontext()
            with lock, logging_redirect_tqdm():
                accept = tuple(args.continue_with)
                start = run_folder.resume_point(cfg, args.resume, world=world, accept=accept, keep=rank == 0)
                if start is not None and start.finished:
                    if rank == 0:
                        print(f"{start.path.parent} is finished: {start.ckpt['epoch']} of {cfg.train.epochs} "
                              f"epochs trained (step {start.ckpt['step']}), nothing to do. More epochs: "
                              "train.epochs=N; another experiment: log.run_name=NAME", flush=True)
                    return None
                return train(build(cfg, start, accept))
    except NonFiniteLoss as err:
        last = run_folder.path(cfg) / "checkpoint-last.pth"
        kept = f"the last good checkpoint {last} is kept" if last.is_file() else "no checkpoint yet"
        line = (f"error: {err}: stopped before the next checkpoint; {kept}. Try a lower train.base_lr, "
                "train.clip_grad=1.0 or train.precision=fp32, then resume.")
        errors.leave_for_launcher(errors.RUNTIME_FAILURE, line)
        raise SystemExit(line) from err
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
