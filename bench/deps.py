"""Optional packages: the benchmarks record a missing one as a skip instead of failing.

GPU images often lack DALI, FFCV, mlflow and omegaconf (requirements-gpu-image.txt lists what a
bare one holds); `missing()` finds out without importing the package, so a blocked or absent one
costs nothing.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

from pipelines.backends import optional_packages

# module -> the pip distribution that provides it (as named in requirements.txt)
PACKAGES = {
    **optional_packages(),  # the loader backends'
    "cupy": "cupy-cuda13x",
    "mlflow": "mlflow",
    "omegaconf": "omegaconf",
    "mvtbdata": "mvtb-data",
    "skimage": "scikit-image",
    "pytest": "pytest",
}


def missing(*modules: str) -> list[str]:
    """The pip names of those `modules` that cannot be imported here (absent, or blocked)."""
    absent = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or an import hook refuses it
            found = False
        if not found:
            absent.append(PACKAGES.get(module, module))
    return absent


def skip_reason(*modules: str) -> str | None:
    """'skipped: missing <pip names>' when any of `modules` is missing, else None."""
    absent = missing(*modules)
    return f"skipped: missing {', '.join(absent)}" if absent else None


def version(module: str) -> str | None:
    """The installed version of the distribution providing `module` (any CUDA flavour), None if missing."""
    if missing(module):
        return None
    top = module.split(".")[0]
    wanted = PACKAGES.get(module, module).rsplit("-cuda", 1)[0]  # nvidia-dali-cuda130 -> nvidia-dali
    for dist in metadata.packages_distributions().get(top, []):
        if dist.lower().startswith(wanted):
            return metadata.version(dist)
    return None
