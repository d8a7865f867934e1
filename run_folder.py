"""A run folder, `<log.runs_root>/<run name>`, holds one experiment: its name, its lock, its training
checkpoints, the list of its data files and the MLflow run id a sync left there.

    folder = path(cfg)                      # runs/demo
    with hold(folder): ...                  # one training at a time, or RunFolderInUse naming the holder
    start = resume_point(cfg, resume, world=world_size, accept=keys)  # None: a fresh run
    check_data(start, loader.manifest, loader.data_signature, accept=keys)
    save_checkpoint(state, folder / "checkpoint-last.pth")

A checkpoint stores the resolved config, the data signature and the number of processes it was
trained with. A start compares them with its own: a change of a key that extends or observes the
run (`configs.fingerprint.RESUMABLE`: more epochs, logging, the loader and its workers, the world
size) continues the run and is recorded (`Start.changes`); any other change, data included, raises
AnotherExperiment naming each key with both values, unless `accept` (--continue-with) names it.

The lock file sits beside the run folder (`<runs root>/.<run name>.lock`), so a run stopped by a bad
input before training leaves no run folder behind. The lock ends with the process (flock), even
after kill -9; the file records who holds it, for the message the second process prints.
Checkpoints are written atomically; a rerun whose checkpoint-last.pth is broken continues from the
newest good checkpoint-<epoch>.pth.
"""

from __future__ import annotations

import fcntl
import gzip
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import tracking
from configs import Config, ConfigError, flatten
from configs.config import TrainConfig
from configs.fingerprint import DATA_SIGNATURE, WORLD_SIZE, is_resumable
from errors import RunFailure, UserError
from model.checkpoint import CheckpointError, read_checkpoint
from pipelines import Manifest

log = logging.getLogger("train")
DATA_FILES = "data-files.tsv.gz"  # the run's data files and labels, to say what changed in the data
ABSENT = "(absent)"  # a key one of two configs does not have (e.g. model.args.depth)


class RunFolderInUse(UserError):
    """Another process trains into the same run folder."""


class AnotherExperiment(UserError):
    """The run folder's checkpoint was trained with other settings or other data than this start's."""


@dataclass
class Start:
    """The checkpoint a run continues and what this start changes in it: {key: (old, new)}."""

    path: Path
    ckpt: dict
    changes: dict[str, tuple[Any, Any]]
    epochs: int  # this start's train.epochs

    @property
    def finished(self) -> bool:
        """Whether the checkpoint already holds every epoch this start asks for."""
        return self.ckpt["epoch"] >= self.epochs

    def describe(self, keys: list[str] | None = None) -> str:
        """`key old -> new; ...` of the changes (or of `keys`), in key order."""
        return "; ".join(f"{key} {_text(self.changes[key][0])} -> {_text(self.changes[key][1])}"
                         for key in (self.changes if keys is None else keys))


def path(cfg: Config) -> Path:
    """<log.runs_root>/<log.run_name, else the config's name>."""
    return Path(cfg.log.runs_root) / (cfg.log.run_name or cfg.name)


def lock_path(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.lock")


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block, or raise RunFolderInUse naming the holder."""
    lock_file = lock_path(run_dir)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunFolderInUse(f"run folder {run_dir} is in use by {holder} (lock {lock_file}); wait for "
                                 "it to end, or choose another log.run_name") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_run_id(run_dir: Path) -> str | None:
    """The MLflow run id `colormae-tracking sync` wrote into the run folder when it created the run
    (the store was down from the start), if any: the resume continues that run."""
    synced = run_dir / tracking.RUN_ID_FILE
    return synced.read_text().strip() if synced.is_file() else None


def save_checkpoint(state: dict, path: Path) -> None:
    """Write atomically: a crash or a full disk mid-write leaves the previous file and no temp file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch's zip writer reports the file's failed write (a full disk) as a RuntimeError: its context
        cause = err.__context__ if isinstance(err, RuntimeError) else err
        if isinstance(cause, OSError):
            kept = f"; the last good {path.name} is kept" if path.is_file() else ""
            raise RunFailure(f"could not save {path}: {cause.strerror or cause}{kept}") from err
        raise


def check_same_model(ckpt: dict, model_args: dict[str, Any], path: str | Path) -> None:
    """Raise a CheckpointError when the checkpoint was written by another architecture."""
    stored = ckpt.get("model_args")
    if stored is not None and dict(stored) != dict(model_args):
        differ = sorted(k for k in {**stored, **model_args} if stored.get(k) != model_args.get(k))
        shown = ", ".join(f"{k} {stored.get(k)} vs {model_args.get(k)}" for k in differ[:6])
        raise CheckpointError(f"{path} holds another model than this run builds ({shown}); "
                              "use the config it was trained with, or another log.run_name")


def newest_good_checkpoint(run_dir: Path) -> Path | None:
    """The readable checkpoint-<epoch>.pth of the highest epoch in `run_dir`, if any."""
    numbered = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*.pth")
                if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", p.name))]
    for _, candidate in sorted(numbered, reverse=True):
        try:
            read_checkpoint(candidate)
            return candidate
        except CheckpointError as err:
            log.warning("%s", err)
    return None


def keep_aside(path: Path) -> Path:
    """Keep a broken file as <name>.corrupt-<time> for inspection; returns that path.

    A hard link (a copy where links are not supported): the original name stays readable for the
    other ranks until the next save replaces it.
    """
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.link(path, aside)
    except OSError:
        shutil.copyfile(path, aside)
    return aside


def find_checkpoint(run_dir: Path, resume: str | None, *, keep: bool = True) -> tuple[Path, dict] | None:
    """(path, checkpoint) to continue: --resume (a checkpoint or a run folder), else the run folder's
    checkpoint-last.pth if there is one (None: a fresh run). A broken checkpoint-last.pth on a plain
    rerun: the newest good checkpoint-<epoch>.pth (`read_training_checkpoint`)."""
    path = run_dir / "checkpoint-last.pth" if resume is None else Path(resume)
    path = path / "checkpoint-last.pth" if path.is_dir() else path
    if not path.is_file():
        if resume is not None:
            raise CheckpointError(f"--resume {resume}: no checkpoint at {path}")
        return None
    return read_training_checkpoint(path, recover=resume is None, keep=keep)


def read_training_checkpoint(path: Path, *, recover: bool = False, keep: bool = True) -> tuple[Path, dict]:
    """(path, checkpoint) of a train.py checkpoint to resume.

    recover: when `path` is unreadable, continue from the newest good checkpoint-<epoch>.pth of its
    folder instead, keeping the broken file aside (when `keep`: one rank does it) and saying so.
    """
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as err:
        fallback = newest_good_checkpoint(path.parent) if recover else None
        if fallback is None:
            raise
        if keep:
            log.warning("%s: kept it as %s; continuing from %s", err, keep_aside(path).name, fallback.name)
        path, ckpt = fallback, read_checkpoint(fallback)
    missing = sorted({"optimizer", "scaler", "epoch", "step", "loader", "rng"} - set(ckpt))
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (no {', '.join(missing)})")
    return path, ckpt


def resume_point(cfg: Config, resume: str | None, *, world: int, accept: tuple[str, ...] = (),
                 keep: bool = True) -> Start | None:
    """The checkpoint this run continues (`find_checkpoint`; None: a fresh run), with the changes of
    `cfg` and the world size from those it was trained with. Raises AnotherExperiment when a change
    is neither resumable (`configs.fingerprint.RESUMABLE`; train.epochs upward only) nor in `accept`,
    and a ConfigError when `accept` names a key the config does not have."""
    known = {*flatten(cfg), DATA_SIGNATURE}
    unknown = [key for key in accept if key not in known]
    if unknown:
        raise ConfigError(f"--continue-with {','.join(unknown)}: no such config key (keys look like "
                          "mask.schedule, train.base_lr or data.signature)")
    found = find_checkpoint(path(cfg), resume, keep=keep)
    if found is None:
        return None
    ckpt_path, ckpt = found
    old = {**flatten(ckpt["config"]), WORLD_SIZE: len(ckpt["loader"])}
    new = {**flatten(cfg), WORLD_SIZE: world}
    changes = {key: (old.get(key, ABSENT), new.get(key, ABSENT)) for key in sorted(old.keys() | new.keys())
               if old.get(key, ABSENT) != new.get(key, ABSENT)}
    start = Start(ckpt_path, ckpt, changes, epochs=cfg.train.epochs)
    refuse(start, accept)
    return start


def refuse(start: Start, accept: tuple[str, ...], summary: str = "") -> None:
    """Raise AnotherExperiment naming each change that is neither resumable nor accepted."""
    refused = [key for key, (old, new) in start.changes.items() if key not in accept and not (
        is_resumable(key) and (key != "train.epochs" or (old != ABSENT and new > old)))]
    if refused:
        at = f"epoch {start.ckpt['epoch']}, step {start.ckpt['step']}"
        raise AnotherExperiment(
            f"{start.path} holds another experiment ({at}): {start.describe(refused)}{summary}. Start a "
            "new run with log.run_name=NAME, or continue this one on purpose with --continue-with "
            f"{','.join(refused)}")


def check_data(start: Start, manifest: Manifest | None, signature: str, accept: tuple[str, ...] = ()) -> None:
    """Add a changed data signature to `start.changes`, or raise AnotherExperiment with what changed
    (files added, removed, relabelled) unless `accept` names data.signature. A checkpoint without a
    signature (written before they were recorded) is not checked."""
    old = start.ckpt.get("data_signature")
    if old is None or old == signature:
        return
    start.changes[DATA_SIGNATURE] = (old, signature)
    refuse(start, accept, summary=f" ({data_changes(start.path.parent, manifest)})")


def write_data_files(run_dir: Path, manifest: Manifest | None) -> None:
    """Record the data's files and labels in the run folder (once per data signature)."""
    if manifest is None:
        return
    listing = run_dir / DATA_FILES
    header = f"# signature {manifest.signature()}\n"
    if listing.is_file():
        with gzip.open(listing, "rt") as f:
            if f.readline() == header:
                return
    lines = "".join(f"{label}\t{file}\n" for file, label in zip(manifest.files, manifest.labels, strict=True))
    with gzip.open(listing.with_name(listing.name + ".tmp"), "wt") as f:
        f.write(header + lines)
    os.replace(listing.with_name(listing.name + ".tmp"), listing)


def data_changes(run_dir: Path, manifest: Manifest | None) -> str:
    """What differs between the run folder's recorded data files and `manifest`'s, in words."""
    listing = run_dir / DATA_FILES
    if manifest is None or not listing.is_file():
        return "the data's files were not recorded: no detail"
    with gzip.open(listing, "rt") as f:
        old = dict(reversed(line.rstrip("\n").split("\t", 1)) for line in f if not line.startswith("#"))
    new = {file: str(label) for file, label in zip(manifest.files, manifest.labels, strict=True)}
    relabelled = sum(old[file] != new[file] for file in old.keys() & new.keys())
    return (f"{len(old)} -> {len(new)} images: {len(new.keys() - old.keys())} files added, "
            f"{len(old.keys() - new.keys())} removed, {relabelled} changed class")


def _text(value: Any) -> str:
    """A value as an override writes it (null for None)."""
    return "null" if value is None else str(value)


# --- resuming on any number of processes (elastic) -------------------------------------------


def check_resumable(path: Path, ckpt: dict, model_args: dict, *, steps_per_epoch: int) -> None:
    """Raise a UserError when this run cannot continue the checkpoint (on any number of processes)."""
    check_same_model(ckpt, model_args, path)
    if ckpt["step"] // steps_per_epoch != ckpt["epoch"]:
        raise ConfigError(f"{path} (epoch {ckpt['epoch']}, step {ckpt['step']}) was written with "
                          f"another number of steps per epoch than this run's {steps_per_epoch}: "
                          "resume with the same batch size, accumulation, steps_per_epoch and data")


def checkpoint_micro_batch(ckpt: dict) -> int:
    """The per-process micro-batch a checkpoint was trained with (older ones: from its config)."""
    if "micro_batch" in ckpt:
        return ckpt["micro_batch"]
    t = ckpt["config"]["train"]
    return t["batch_size"] // (len(ckpt["loader"]) * t["accum_steps"])


def split_batch(t: TrainConfig, world: int, ckpt: dict | None) -> tuple[int, int]:
    """(per-process micro-batch, accumulation steps) that make train.batch_size on `world` processes.

    As configured (batch_size / (world x accum_steps)), unless `ckpt` was written by another number of
    processes (an elastic restart): then the largest micro-batch up to the checkpoint's that divides
    each process's share (memory per process stays bounded), and as many accumulation steps as keep
    the global batch. `validate` has checked that the batch splits over `world`.
    """
    if ckpt is None or len(ckpt["loader"]) == world:
        return t.batch_size // (world * t.accum_steps), t.accum_steps
    share, before = t.batch_size // world, checkpoint_micro_batch(ckpt)
    accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= before)
    return share // accum, accum


def loader_state(ckpt: dict, rank: int, world: int) -> dict:
    """This rank's loader state: its own on the same number of processes; else the epoch position the
    ranks share, in samples (an older {"epoch", "batches"} counts batches of the checkpoint's world)."""
    states = ckpt["loader"]
    state = states[rank] if len(states) == world else states[0]
    if "batches" in state and len(states) != world:
        samples = state["batches"] * checkpoint_micro_batch(ckpt) * len(states)
        state = {"epoch": state["epoch"], "samples": samples}
    return state
