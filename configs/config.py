"""Training configuration: a dataclass schema, YAML files with dotted overrides, and validation.

    cfg = load_config("configs/demo.yaml", ["train.epochs=2", "mask.schedule=blue"])
    validate(cfg, world_size=1)   # raises ConfigError listing every problem, before any compute

A YAML file may start from another one with `base: other.yaml` (path relative to the file) and
change only what differs, e.g. the 300/800/1600-epoch variants of the paper recipe.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from errors import UserError

LOADERS = ("torch", "dali", "ffcv")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(UserError):
    """A configuration problem; the message names the key, the bad value and what is allowed."""


def _safe_yaml(text: str, where: str) -> Any:
    """Plain YAML values only: a syntax error or a tag such as !!python/... is a one-line ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        tags = " (tags such as !!python/... are not allowed)" if "constructor for the tag" in problem else ""
        raise ConfigError(f"{where}{line}: {problem}{tags}") from None


@dataclass
class ModelConfig:
    preset: str = "vit_base"  # a key of model.PRESETS
    norm_pix_loss: bool = True  # per-patch normalised pixel targets
    args: dict = field(default_factory=dict)  # extra build_mae keyword arguments, e.g. {depth: 2}


@dataclass
class DataConfig:
    loader: str = "torch"  # torch | dali | ffcv
    path: str = "data/imagenet/train"  # class-folder root of the training split
    ffcv_path: str | None = None  # .beton for the ffcv loader (built from `path` when None)
    img_size: int = 224
    workers: int | None = None  # loader workers per rank; None = CPU count


@dataclass
class MaskConfig:
    schedule: str = "green"  # a colour, `random`, or `colour@epoch,...`
    ratio: float = 0.75  # share of patches hidden
    bank: str | None = None  # the authors' pattern file (.npz) instead of generated noise


@dataclass
class TrainConfig:
    epochs: int = 800
    warmup_epochs: int = 40
    batch_size: int = 4096  # images per optimiser step, all ranks and accumulation steps together
    accum_steps: int = 1  # gradient accumulation: micro-batch = batch_size / (world size * accum_steps)
    steps_per_epoch: int | None = None  # cap on optimiser steps per epoch (short demo/smoke runs)
    base_lr: float = 1.5e-4  # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    clip_grad: float | None = None
    precision: str = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto = cuda when available
    seed: int = 0
    checkpoint_every: int = 50  # keep checkpoint-<epoch>.pth every N epochs (checkpoint-last always)


@dataclass
class LogConfig:
    runs_root: str = "runs"  # run folders, and the default MLflow store (mlflow.db, mlartifacts/)
    run_name: str | None = None  # run folder name; default: the config file's name
    experiment: str = "colormae"
    mlflow: bool = True
    mlflow_uri: str | None = None  # tracking server; default MLFLOW_TRACKING_URI, else SQLite in runs_root
    every_steps: int = 20  # metrics every N optimiser steps (and at every epoch end)
    recon_every: int = 1  # reconstruction grid every N epochs (0 = never)
    weights_every: int = 0  # log the encoder to MLflow every N epochs too (0 = at the end only)
    register_model: str | None = None  # also register the final encoder under this model name
    system_metrics: bool = True  # MLflow's CPU / memory / GPU metrics of the run


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    name: str = "default"  # set from the config file name

    @property
    def lr(self) -> float:
        """Peak learning rate: base_lr scaled by the effective batch."""
        return self.train.base_lr * self.train.batch_size / 256


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}; known: {', '.join(known)}"


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the field's type, or raise ConfigError naming the key."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint) or hint
    try:
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, int | float | str) and not isinstance(value, bool):
            return float(value)  # YAML reads "1.5e-4" as a string
        if origin is str and isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        if origin is dict and isinstance(value, dict):
            return dict(value)
        if origin is list and isinstance(value, list | tuple):
            return [_coerce(key, v, typing.get_args(hint)[0]) for v in value]
    except ValueError:
        pass
    name = getattr(hint, "__name__", str(hint))
    raise ConfigError(f"config key '{key}' must be {name}, got {value!r}")


def _merge(obj: Any, values: dict, prefix: str = "") -> None:
    """Write nested `values` into the dataclass `obj`, checking names and types."""
    hints = typing.get_type_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj) if f.name != "name"]
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(_unknown(path, known))
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{path}' must be a mapping, got {value!r}")
            _merge(current, value, f"{path}.")
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _read_yaml(path: Path) -> dict:
    """Read a config file, following `base:` links (the base first, this file on top)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    values = _safe_yaml(path.read_text(), f"config file {path}") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = values.pop("base", None)
    if base is None:
        return values
    merged = _read_yaml(path.parent / base)
    for section, entries in values.items():
        if isinstance(entries, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **entries}
        else:
            merged[section] = entries
    return merged


def parse_override(text: str) -> dict:
    """`train.epochs=2` -> {"train": {"epochs": 2}} (the value is read as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.epochs=2")
    nested: dict = {}
    node = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = _safe_yaml(raw, f"override '{text}'") if raw.strip() else None
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (with its bases), then each `key=value` override in order."""
    cfg = Config()
    if path is not None:
        cfg.name = Path(path).stem
        _merge(cfg, _read_yaml(Path(path)))
    for text in overrides:
        _merge(cfg, parse_override(text))
    return cfg


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted keys to plain values, e.g. {"train.epochs": 800, ...} (for MLflow params)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(dataclasses.asdict(cfg), "")
    return flat


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (stored in checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML that `train.py --config FILE` runs as is (same run folder name)."""
    values = to_dict(cfg)
    values["log"]["run_name"] = cfg.log.run_name or values.pop("name")
    values.pop("name", None)
    return yaml.safe_dump(values, sort_keys=False)


def from_dict(values: dict) -> Config:
    """Inverse of to_dict."""
    values = dict(values)
    cfg = Config(name=values.pop("name", "default"))
    _merge(cfg, values)
    return cfg


def model_kwargs(cfg: Config) -> dict:
    """Keyword arguments for model.build_mae(cfg.model.preset, **kwargs)."""
    return {"img_size": cfg.data.img_size, "norm_pix_loss": cfg.model.norm_pix_loss, **cfg.model.args}


def writable_problem(folder: str | Path) -> str | None:
    """Why files cannot be created under `folder` (or the nearest existing folder above it), if so."""
    existing = Path(folder).absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            return None
    except OSError as err:
        return f"{existing} is not writable ({err.strerror or err})"


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check every value before any compute; raise one ConfigError listing all problems."""
    import torch

    from model import PRESETS, build_mae
    from noise import MASK_TYPES, parse_schedule
    from noise.bank import load_pattern_file

    problems: list[str] = []
    m, d, t, log = cfg.model, cfg.data, cfg.train, cfg.log
    if m.preset not in PRESETS:
        problems.append(f"model.preset '{m.preset}' is unknown; choose one of {sorted(PRESETS)}")
    else:
        try:  # on the meta device: checks the architecture (patch divides image, heads divide width)
            with torch.device("meta"):
                build_mae(m.preset, **model_kwargs(cfg))
        except (ValueError, TypeError) as err:
            problems.append(f"model (preset {m.preset}, data.img_size {d.img_size}, args {m.args}): {err}")
    if d.loader not in LOADERS:
        problems.append(f"data.loader '{d.loader}' is unknown; choose one of {', '.join(LOADERS)}")
    has_beton = d.loader == "ffcv" and d.ffcv_path and Path(d.ffcv_path).is_file()
    if not has_beton and not Path(d.path).is_dir():
        problems.append(f"data.path '{d.path}' is not a folder (expected class sub-folders of images)")
    elif not has_beton and not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(d.path)):
        problems.append(f"data.path '{d.path}' has no class sub-folders (expected {d.path}/<class>/<image>)")
    if not 0.0 < cfg.mask.ratio < 1.0:
        problems.append(f"mask.ratio {cfg.mask.ratio} must lie strictly between 0 and 1")
    try:
        for _, colour in parse_schedule(cfg.mask.schedule):
            if colour not in MASK_TYPES:
                raise ValueError(f"unknown colour '{colour}'")
    except ValueError as err:
        problems.append(
            f"mask.schedule '{cfg.mask.schedule}' is invalid ({err}); use one of {', '.join(MASK_TYPES)} "
            "or colour@epoch pairs like green@0,blue@200"
        )
    if cfg.mask.bank:
        try:
            load_pattern_file(cfg.mask.bank)
        except (OSError, ValueError) as err:
            problems.append(f"mask.bank '{cfg.mask.bank}': {err}")
    if t.precision not in PRECISIONS:
        problems.append(f"train.precision '{t.precision}' is unknown; choose one of {', '.join(PRECISIONS)}")
    if t.device not in DEVICES:
        problems.append(f"train.device '{t.device}' is unknown; choose one of {', '.join(DEVICES)}")
    for key in ("epochs", "batch_size", "accum_steps", "checkpoint_every"):
        if getattr(t, key) < 1:
            problems.append(f"train.{key} must be at least 1, got {getattr(t, key)}")
    if not 0 <= t.warmup_epochs <= t.epochs:
        problems.append(f"train.warmup_epochs {t.warmup_epochs} must lie in [0, train.epochs={t.epochs}]")
    if t.steps_per_epoch is not None and t.steps_per_epoch < 1:
        problems.append(f"train.steps_per_epoch must be at least 1 or null, got {t.steps_per_epoch}")
    per_step = world_size * max(t.accum_steps, 1)
    if t.batch_size % per_step:
        problems.append(
            f"train.batch_size {t.batch_size} is not divisible by world size {world_size} x "
            f"train.accum_steps {t.accum_steps}"
        )
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        problems.append(f"train.betas {t.betas} must be two numbers in [0, 1)")
    if not (math.isfinite(t.base_lr) and t.base_lr > 0):
        problems.append(f"train.base_lr must be a positive finite number, got {t.base_lr}")
    elif not (math.isfinite(t.min_lr) and 0 <= t.min_lr <= cfg.lr):
        problems.append(f"train.min_lr must lie in [0, peak lr {cfg.lr:.3g}] (base_lr x batch_size / 256), "
                        f"got {t.min_lr}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        problems.append(f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}")
    if t.clip_grad is not None and not (math.isfinite(t.clip_grad) and t.clip_grad >= 0):
        problems.append(f"train.clip_grad must be a finite number >= 0 (0 or null: off), got {t.clip_grad}")
    if d.workers is not None and d.workers < 0:
        problems.append(f"data.workers must be >= 0 or null, got {d.workers}")
    unwritable = writable_problem(log.runs_root)
    if unwritable:
        problems.append(f"log.runs_root '{log.runs_root}': {unwritable}")
    if log.every_steps < 1 or log.recon_every < 0 or log.weights_every < 0:
        problems.append("log.every_steps must be >= 1, log.recon_every and log.weights_every >= 0")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
