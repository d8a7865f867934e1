"""The loader backends, one row each: what `data.loader` may name and what each backend needs.

Strings only (no imports), so the config check, the command lines, the benchmarks, gpu_check,
tracking and docker/check_env (which loads this file by path: the image does not install the
project) all read it without loading torch or an optional package. A new backend is one file in
pipelines/ (a `BaseLoader` subclass, see base.py) and one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backend:
    """One loader backend: its class, the optional packages it imports and what it can do."""

    target: str  # "module:Class" inside pipelines/
    # the optional modules it imports -> the pip distribution providing each (as in requirements.txt);
    # the first is its own library, whose version runs record
    packages: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu", "cuda")  # where it can deliver batches (LoaderConfig.device)
    slow_start: str | None = None  # why it takes minutes to build on a small CPU (gpu_check --smoke skips it)


BACKENDS = {
    "torch": Backend("torch_loader:TorchLoader"),
    "dali": Backend("dali_loader:DALILoader", {"nvidia.dali": "nvidia-dali-cuda130"}),
    "ffcv": Backend("ffcv_loader:FFCVLoader", {"ffcv": "ffcv"},
                    slow_start="ffcv's numba compilation takes minutes on a small CPU"),
}
LOADERS = tuple(BACKENDS)


def optional_packages() -> dict[str, str]:
    """Every backend's optional modules -> their pip distributions."""
    return {module: dist for backend in BACKENDS.values() for module, dist in backend.packages.items()}
