"""Where a run comes from: its source, user and git commit (tags), its machine and packages (artifacts)."""

from __future__ import annotations

import os
import platform
import pwd
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def user_name() -> str:
    """USER, else the name of this uid, else the uid itself (a container's uid may have no passwd entry)."""
    if os.environ.get("USER"):
        return os.environ["USER"]
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


def git_commit() -> str:
    """The commit this code runs at (GIT_COMMIT wins: images carry no .git); "unknown" without one."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # no git on this machine
        return "unknown"
    return out.stdout.strip() or "unknown"


def standard_tags(source_name: str, commit: str | None = None) -> dict[str, str]:
    """MLflow's own source, user and commit tags, which fill the run page's Source and Created by;
    `commit` defaults to `git_commit()`."""
    commit = git_commit() if commit is None else commit
    tags = {"mlflow.source.name": source_name, "mlflow.source.type": "LOCAL", "mlflow.user": user_name()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def environment() -> dict[str, Any]:
    """Python, CUDA/driver/GPUs and the versions of the loader libraries, for the run's artifacts."""
    import torch

    from pipelines.backends import optional_packages

    packages = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    libraries = (*(dist.split("-cuda")[0] for dist in optional_packages().values()), "cupy")
    loaders = {name: version for name, version in packages.items() if name.startswith(libraries)}
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    driver = nvidia_smi("driver_version").get("driver_version") if gpus else None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "gpus": gpus,
            "driver": driver, "loader_libraries": loaders,
            "pip_freeze": sorted(f"{name}=={version}" for name, version in packages.items())}


def nvidia_smi(*fields: str) -> dict[str, str]:
    """The first GPU's `fields` (e.g. "name", "driver_version") as nvidia-smi reports them; empty when
    there is no GPU, no nvidia-smi or no usable answer."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    values = [value.strip() for value in out.stdout.partition("\n")[0].split(",")]
    usable = out.returncode == 0 and len(values) == len(fields) and all(values)
    return dict(zip(fields, values, strict=True)) if usable else {}
