"""The `log:` section of a training config (imports nothing heavy: `--print-config` reads it)."""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LogConfig:
    """The `log:` section of a training config: where runs go and what MLflow records."""

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

    def check(self) -> list[str]:
        """Problems, one line each naming its key: an unwritable runs root, negative intervals, MLflow
        asked for where it is not installed (a bare GPU image)."""
        problems = []
        if self.mlflow and not mlflow_installed():
            problems.append("log.mlflow is true but mlflow is not installed here: set log.mlflow=false "
                            "(or pip install mlflow)")
        unwritable = writable_problem(self.runs_root)
        if unwritable:
            problems.append(f"log.runs_root '{self.runs_root}': {unwritable}")
        if self.every_steps < 1 or self.recon_every < 0 or self.weights_every < 0:
            problems.append("log.every_steps must be >= 1, log.recon_every and log.weights_every >= 0")
        return problems


def mlflow_installed() -> bool:
    """Whether mlflow can be imported here (found without importing it; an import hook may refuse it)."""
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        return False


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
