"""The trainer's configuration: its own `train:` section composed with the sections of the packages.

    cfg = load_config("configs/demo.yaml", ["train.epochs=2", "mask.schedule=blue"])
    validate(cfg, world_size=1)   # raises ConfigError listing every problem, before any compute

Each section is a dataclass declared beside the code that uses it, and checks its own values:
`model.ModelConfig`, `pipelines.DataConfig`, `noise.MaskConfig`, `tracking.LogConfig`, and here
`TrainConfig` (the optimiser, schedule and precision of train.py). OmegaConf reads the YAML,
merges defaults <- file <- overrides and checks key names and types against these dataclasses;
this module only words its errors as one line naming the key.

A YAML file may start from another one with `base: other.yaml` (path relative to the file) and
change only what differs, e.g. the 300/800/1600-epoch variants of the paper recipe. Mappings merge
key by key (so `model.args={depth: 2}` changes the depth and keeps the other arguments).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from cli import DEVICES
from errors import UserError
from model.config import ModelConfig
from noise.config import MaskConfig
from pipelines.config import DataConfig
from tracking.config import LogConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SHIPPED = Path(__file__).parent  # the demo and the paper recipes (package data of the wheel too)


class ConfigError(UserError):
    """A configuration problem; the message names the key, the bad value and what is allowed."""


@dataclass
class TrainConfig:
    """The `train:` section: the optimiser, its schedule, precision and checkpoints of train.py."""

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
    checkpoint_every: int = 50  # keep checkpoint-<epoch>.pth every N epochs (checkpoint-last always); 0: no
    # checkpoint files at all (benchmarks: a stopped run cannot resume)

    @property
    def lr(self) -> float:
        """Peak learning rate: base_lr scaled by the effective batch."""
        return self.base_lr * self.batch_size / 256

    def check(self, world_size: int) -> list[str]:
        """Problems, one line each naming its key (the batch must split over `world_size` ranks)."""
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"train.precision '{self.precision}' is unknown; "
                            f"choose one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            problems.append(f"train.device '{self.device}' is unknown; choose one of {', '.join(DEVICES)}")
        for key in ("epochs", "batch_size", "accum_steps"):
            if getattr(self, key) < 1:
                problems.append(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if self.checkpoint_every < 0:
            problems.append(f"train.checkpoint_every must be >= 0 (0: no checkpoint files), "
                            f"got {self.checkpoint_every}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            problems.append(f"train.warmup_epochs {self.warmup_epochs} must lie in "
                            f"[0, train.epochs={self.epochs}]")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            problems.append(f"train.steps_per_epoch must be at least 1 or null, got {self.steps_per_epoch}")
        if self.batch_size % (world_size * max(self.accum_steps, 1)):
            problems.append(f"train.batch_size {self.batch_size} is not divisible by world size "
                            f"{world_size} x train.accum_steps {self.accum_steps}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"train.betas {self.betas} must be two numbers in [0, 1)")
        if not (math.isfinite(self.base_lr) and self.base_lr > 0):
            problems.append(f"train.base_lr must be a positive finite number, got {self.base_lr}")
        elif not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            problems.append(f"train.min_lr must lie in [0, peak lr {self.lr:.3g}] "
                            f"(base_lr x batch_size / 256), got {self.min_lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.clip_grad is not None and not (math.isfinite(self.clip_grad) and self.clip_grad >= 0):
            problems.append(f"train.clip_grad must be a finite number >= 0 (0 or null: off), "
                            f"got {self.clip_grad}")
        return problems


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    name: str = "default"  # the config file's name (not a key of the file)

    @property
    def lr(self) -> float:
        """Peak learning rate: base_lr scaled by the effective batch."""
        return self.train.lr


def _keys(schema: type) -> list[str]:
    """The YAML keys of a section (or of the whole config: the sections; `name` is not a key)."""
    return [f.name for f in dataclasses.fields(schema) if f.name != "name"]


def _unknown(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown config key '{key}'{hint}; known: {', '.join(known)}"


def _type_name(hint: Any) -> str:
    """`int` for int, `float` for `float | None`, `list` for list[float]."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def _one_line(err: OmegaConfBaseException, where: str) -> str:
    """An OmegaConf error as one line naming the config key (or the file / override it came from)."""
    schema = err.object_type if dataclasses.is_dataclass(err.object_type) else None
    if schema and isinstance(err, ConfigKeyError):
        return _unknown(err.full_key, _keys(schema))
    if schema and isinstance(err, ValidationError) and err.full_key:
        expected = _type_name(typing.get_type_hints(schema)[err.key])
        return f"config key '{err.full_key}' must be {expected}, got {err.value!r}"
    return f"{where}: {str(err).splitlines()[0]}"


@contextmanager
def _reported(where: str) -> Iterator[None]:
    """OmegaConf's and YAML's errors as one-line ConfigErrors."""
    try:
        yield
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err, where)) from None
    except yaml.YAMLError as err:  # a syntax error, or a tag such as !!python/... (safe loading only)
        mark = getattr(err, "problem_mark", None)
        line = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        tags = " (tags such as !!python/... are not allowed)" if "constructor for the tag" in problem else ""
        raise ConfigError(f"{where}{line}: {problem}{tags}") from None


def _merge(merged: DictConfig, values: DictConfig | dict, where: str) -> DictConfig:
    """`values` (a file's, an override's) merged onto `merged`, checked against the schema."""
    if "name" in values:  # the name comes from the config file's name
        raise ConfigError(_unknown("name", _keys(Config)))
    with _reported(where):
        return OmegaConf.merge(merged, values)


def _merge_file(merged: DictConfig, path: Path) -> DictConfig:
    """A config file merged onto `merged`, after the file it names as `base:` (if any)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with _reported(f"config file {path}"):
        values = OmegaConf.load(path)
    if not isinstance(values, DictConfig):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = values.pop("base", None)
    if base is not None:
        merged = _merge_file(merged, path.parent / base)
    return _merge(merged, values, f"config file {path}")


def _override(merged: DictConfig, text: str) -> DictConfig:
    """`train.epochs=2` merged onto `merged` (the value is read as YAML)."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. train.epochs=2")
    where = f"override '{text}'"
    with _reported(where):
        values = OmegaConf.from_dotlist([text])
    return _merge(merged, values, where)


def _to_config(merged: DictConfig, name: str) -> Config:
    with _reported(f"config {name}"):
        cfg = OmegaConf.to_object(merged)
    cfg.name = name
    return cfg


def find_config(path: str | Path) -> Path:
    """`path`, else the config of that name shipped in this package (`configs/demo.yaml` or `demo.yaml`
    from any folder, and from an installed wheel)."""
    path, shipped = Path(path), SHIPPED / Path(path).name
    if not path.exists() and path.parent.name in ("", "configs") and shipped.is_file():
        return shipped
    return path


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file (with its bases), then each `key=value` override in order.

    Without a log.run_name, overrides that change the mask schedule or the seed name the run
    (`default_run_name`), so that they never continue the file's own run.
    """
    merged = OmegaConf.structured(Config)
    if path is not None:
        merged = _merge_file(merged, find_config(path))
    name = "default" if path is None else Path(path).stem
    file_cfg = _to_config(merged, name)
    for text in overrides:
        merged = _override(merged, text)
    cfg = _to_config(merged, name)
    if cfg.log.run_name is None:
        cfg.log.run_name = default_run_name(cfg, file_cfg)
    return cfg


def default_run_name(cfg: Config, file_cfg: Config) -> str | None:
    """The config file's name, then the mask schedule and the seed where `cfg` changes the file's
    (`demo-blue`, `demo-blue-seed3`): the settings a comparison of runs varies. None: unchanged."""
    parts = [cfg.mask.schedule] if cfg.mask.schedule != file_cfg.mask.schedule else []
    parts += [f"seed{cfg.train.seed}"] if cfg.train.seed != file_cfg.train.seed else []
    return "-".join([cfg.name, *parts]) if parts else None


def from_dict(values: dict) -> Config:
    """Inverse of to_dict."""
    values = dict(values)
    name = values.pop("name", "default")
    return _to_config(_merge(OmegaConf.structured(Config), values, "config"), name)


def to_dict(cfg: Config) -> dict:
    """Nested plain dict (stored in checkpoints)."""
    return dataclasses.asdict(cfg)


def flatten(cfg: Config | dict) -> dict[str, Any]:
    """Dotted keys to plain values, e.g. {"train.epochs": 800, ...} (for MLflow params); also of a
    config as a nested dict (`to_dict`'s form, as checkpoints store it)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(cfg if isinstance(cfg, dict) else to_dict(cfg), "")
    return flat


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML that `train.py --config FILE` runs as is (same run folder name)."""
    values = to_dict(cfg)
    values["log"]["run_name"] = cfg.log.run_name or values.pop("name")
    values.pop("name", None)
    return yaml.safe_dump(values, sort_keys=False)


def model_kwargs(cfg: Config) -> dict:
    """Keyword arguments for model.build_mae(cfg.model.preset, **kwargs)."""
    return cfg.model.kwargs(cfg.data.img_size)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Check every section before any compute; raise one ConfigError listing all problems."""
    problems = [*cfg.model.check(cfg.data.img_size), *cfg.data.check(), *cfg.mask.check(),
                *cfg.train.check(world_size), *cfg.log.check()]
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
